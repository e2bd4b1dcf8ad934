"""Multimodal ResoLLM (issue 16): the offline digits + DTMF task, its training and evaluation.

The model, its config and processor live in the self-contained `reso_hf/modeling/` wing (they are copied into
checkpoints for `trust_remote_code=True`); this package holds what only training and benchmarks need.
"""

from . import dtmf
from .data import (
    AUDIO_TEMPLATES,
    DIGIT_NAMES,
    IMAGE_TEMPLATES,
    MultimodalSplit,
    audio_caption,
    build_splits,
    image_caption,
    load_digit_images,
)

__all__ = ["dtmf", "AUDIO_TEMPLATES", "DIGIT_NAMES", "IMAGE_TEMPLATES", "MultimodalSplit", "audio_caption",
           "build_splits", "image_caption", "load_digit_images"]
