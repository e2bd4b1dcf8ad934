"""The offline multimodal task: scikit-learn's handwritten digits (1,797 real 8x8 images) and generated DTMF tones
(`dtmf.py`) of the ten digit keys, with captions.

Splits are seeded and stratified by digit: `test` (held out, for reported figures), `dev` (for choices) and
`train`. Audio clips are drawn per split from independent random streams, so no clip repeats across splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import dtmf

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The first template of each modality is the canonical caption: the captioning target and the zero-shot class
# prompt. The others vary the wording of the contrastive captions.
IMAGE_TEMPLATES = ("a handwritten {name}", "a handwritten digit {name}", "the number {name} written by hand")
AUDIO_TEMPLATES = ("the tone for key {key}", "the telephone tone of key {key}", "a dial tone for {name}")
SPLITS = ("train", "dev", "test")


def image_caption(digit: int, template: int = 0) -> str:
    return IMAGE_TEMPLATES[template].format(name=DIGIT_NAMES[digit])


def audio_caption(digit: int, template: int = 0) -> str:
    return AUDIO_TEMPLATES[template].format(key=str(digit), name=DIGIT_NAMES[digit])


@dataclass
class MultimodalSplit:
    """One split: images (N, 8, 8) uint8 with their digits, audio clips (M, samples) float32 with their digits."""

    images: np.ndarray
    image_labels: np.ndarray
    audio: np.ndarray
    audio_labels: np.ndarray


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digit images as uint8 0-255 (scikit-learn stores 0-16) and their labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digit images come from scikit-learn: pip install 'reso-hf[digits]'") from error
    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _stratified_split(labels: np.ndarray, fractions: dict, rng: np.random.Generator) -> dict:
    indices = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test = int(round(fractions["test"] * len(members)))
        dev = int(round(fractions["dev"] * len(members)))
        indices["test"].extend(members[:test])
        indices["dev"].extend(members[test:test + dev])
        indices["train"].extend(members[test + dev:])
    return {name: np.sort(np.array(value, dtype=np.int64)) for name, value in indices.items()}


def make_audio(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` random DTMF clips of the digit keys, balanced over the ten digits."""
    labels = np.arange(count) % len(DIGIT_NAMES)
    rng.shuffle(labels)
    clips = np.stack([dtmf.random_dtmf_clip(str(label), rng) for label in labels])
    return clips, labels.astype(np.int64)


def build_splits(seed: int = 0, test_fraction: float = 0.2, dev_fraction: float = 0.1,
                 audio_per_split: dict | None = None) -> dict:
    """{"train", "dev", "test"} -> MultimodalSplit. Image split by digit (stratified); audio clip counts per split
    default to the image counts."""
    for name, value in (("test_fraction", test_fraction), ("dev_fraction", dev_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name}={value} is invalid: expected a number in (0, 1)")
    images, labels = load_digit_images()
    rng = np.random.default_rng(seed)
    indices = _stratified_split(labels, {"test": test_fraction, "dev": dev_fraction}, rng)
    splits = {}
    for offset, name in enumerate(SPLITS):
        count = (audio_per_split or {}).get(name, len(indices[name]))
        audio, audio_labels = make_audio(count, np.random.default_rng([seed, 1000 + offset]))
        splits[name] = MultimodalSplit(images[indices[name]], labels[indices[name]], audio, audio_labels)
    return splits
