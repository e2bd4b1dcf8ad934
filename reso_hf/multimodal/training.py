"""Training and evaluation of `ResoLLMForConditionalGeneration` on digits + DTMF (issue 16): `reso-hf train-multimodal`.

Two stages, one optimizer (AdamW, linear warm-up then cosine decay over both):

1. contrastive alignment, `contrastive_steps` steps: a batch of B train images, each paired with a random train
   clip of the same digit and one caption of each (a random template). Loss = InfoNCE(image, image captions) +
   InfoNCE(audio, audio captions) + InfoNCE(image, audio), all pooled embeddings of the decoder (`get_*_embeds`),
   positives = same digit (`info_nce_loss` with a positives matrix, since captions repeat within a batch).
2. captioning, `captioning_steps` steps: next-token loss of the canonical caption after the chat prompt holding
   the image (or the clip), for both modalities, plus `captioning_contrastive_weight` x the stage-1 loss so the
   alignment is kept.

Evaluation on a split (`evaluate`): zero-shot digit accuracy (argmax cosine of the image embedding against the ten
class prompts "a handwritten {digit}"), image->text and audio->text retrieval P@1 (gallery: the split's own
captions, one random template per item; a retrieved caption is right when it names the query's digit, as captions
of one digit are interchangeable), image->audio retrieval P@1 (gallery: the split's clips) and caption exact match
(greedy `generate` from the chat prompt, compared with the canonical caption).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..dynamic_lora.serialization import atomic_write_bytes, atomic_write_text
from ..modeling.configuration_reso_llm import ResoLLMConfig
from ..modeling.configuration_reso_llm_multimodal import ResoLLMMultimodalConfig
from ..modeling.modeling_reso_llm_multimodal import ResoLLMForConditionalGeneration
from ..modeling.processing_reso_llm import ResoLLMProcessor
from .data import AUDIO_TEMPLATES, DIGIT_NAMES, IMAGE_TEMPLATES, audio_caption, build_splits, image_caption
from .dtmf import SAMPLING_RATE


@dataclass
class MultimodalArguments:
    output_dir: str = field(default="outputs/multimodal", metadata={"help": "model/, run_summary.json, loss PNG."})
    seed: int = field(default=0, metadata={"help": "Seed of the data splits, the initialisation and the batches."})
    prime_codes: bool = field(default=True, metadata={
        "help": "Ablation switch: true = prime token codes (text_config.prime_embedding) and the modality bands "
                "(modality_prime_codes); false = the same-size model without either."})
    contrastive_steps: int = field(default=500, metadata={"help": "Stage 1 steps (contrastive alignment)."})
    captioning_steps: int = field(default=400, metadata={"help": "Stage 2 steps (captioning + contrastive)."})
    batch_size: int = field(default=64, metadata={"help": "Images (and as many clips) per step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=40, metadata={"help": "Linear warm-up steps before the cosine decay."})
    captioning_contrastive_weight: float = field(default=0.5, metadata={
        "help": "Weight of the contrastive loss during stage 2 (0 = captioning loss only)."})
    hidden_size: int = field(default=128, metadata={"help": "Decoder width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    prime_code_dim: int = field(default=32, metadata={"help": "Length of the [cos, sin] prime phasor code (even)."})
    vision_tower: str | None = field(default=None, metadata={
        "help": "Pretrained vision tower (folder or Hub id) instead of the tiny random SigLIP one."})
    audio_tower: str | None = field(default=None, metadata={
        "help": "Pretrained Whisper model or encoder (folder or Hub id) instead of the tiny random one."})
    test_fraction: float = field(default=0.2, metadata={"help": "Held-out share of the digit images (per digit)."})
    dev_fraction: float = field(default=0.1, metadata={"help": "Dev share of the digit images (per digit)."})
    train_audio_clips: int = field(default=2000, metadata={"help": "Generated DTMF clips in the train split."})
    eval_split: str = field(default="dev", metadata={"help": "Split evaluated at the end: dev or test."})
    logging_steps: int = field(default=25, metadata={"help": "Steps between logged losses."})
    save_model: bool = field(default=True, metadata={"help": "Save model + processor into output_dir/model."})

    def __post_init__(self):
        if self.eval_split not in ("dev", "test"):
            raise ValueError(f"eval_split={self.eval_split!r} is invalid: expected one of ('dev', 'test')")
        for name in ("contrastive_steps", "captioning_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected an int >= 0")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size} is invalid: expected an int >= 2 (InfoNCE needs negatives)")


ARGUMENT_TYPES = (MultimodalArguments,)


def build_model(args: MultimodalArguments) -> tuple[ResoLLMForConditionalGeneration, ResoLLMProcessor]:
    text = ResoLLMConfig(vocab_size=261, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
                         num_hidden_layers=args.num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, prime_embedding=args.prime_codes,
                         prime_code_dim=args.prime_code_dim, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = ResoLLMMultimodalConfig(text_config=text, modality_prime_codes=args.prime_codes)
    torch.manual_seed(args.seed)
    if args.vision_tower or args.audio_tower:
        model = ResoLLMForConditionalGeneration.from_parts(config, vision_tower=args.vision_tower,
                                                           audio_tower=args.audio_tower)
    else:
        model = ResoLLMForConditionalGeneration(config)
    return model, ResoLLMProcessor.from_config(model.config)


class TaskTensors:
    """A split as model-ready tensors: pixel values, log-mel features, captions and caption prompts."""

    def __init__(self, split, processor: ResoLLMProcessor, rng: np.random.Generator):
        self.image_labels = torch.as_tensor(split.image_labels)
        self.audio_labels = torch.as_tensor(split.audio_labels)
        images = [np.repeat(image[..., None], 3, axis=-1) for image in split.images]
        self.pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        self.input_features = processor.feature_extractor(
            list(split.audio), sampling_rate=SAMPLING_RATE, return_tensors="pt", padding="max_length")["input_features"]
        # One caption per item with a random template: the retrieval galleries.
        self.image_captions = [image_caption(int(d), int(rng.integers(len(IMAGE_TEMPLATES)))) for d in split.image_labels]
        self.audio_captions = [audio_caption(int(d), int(rng.integers(len(AUDIO_TEMPLATES)))) for d in split.audio_labels]


def chat_prompt(processor, marker: str) -> str:
    part = {"type": "image"} if marker == "image" else {"type": "audio"}
    return processor.apply_chat_template([{"role": "user", "content": [part]}], add_generation_prompt=True,
                                         tokenize=False)


class CaptionTable:
    """Token ids of each digit's captioning example (prompt + canonical caption), per modality, built once."""

    def __init__(self, processor: ResoLLMProcessor):
        tokenizer = processor.tokenizer
        self.examples = {}
        for modality, caption in (("image", image_caption), ("audio", audio_caption)):
            prompt = chat_prompt(processor, modality)
            length = processor.image_seq_length if modality == "image" else processor.audio_seq_length
            marker = processor.image_token if modality == "image" else processor.audio_token
            prompt_ids = tokenizer(prompt.replace(marker, marker * length))["input_ids"]
            for digit in range(len(DIGIT_NAMES)):
                answer = tokenizer(" " + caption(digit), add_special_tokens=False)["input_ids"]
                self.examples[modality, digit] = (prompt_ids, answer + [tokenizer.eos_token_id])
        self.pad_id = tokenizer.pad_token_id

    def batch(self, modality: str, digits) -> dict:
        rows = [self.examples[modality, int(d)] for d in digits]
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), self.pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            sequence = prompt + answer
            ids[row, :len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt):len(sequence)] = torch.tensor(answer)
            mask[row, :len(sequence)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _tokenize(processor, texts: list[str]) -> dict:
    return processor.tokenizer(texts, padding=True, return_tensors="pt")


def contrastive_step_loss(model, processor, tensors: TaskTensors, image_index, audio_index, rng) -> torch.Tensor:
    image_digits = tensors.image_labels[image_index]
    audio_digits = tensors.audio_labels[audio_index]
    image_texts = [image_caption(int(d), int(rng.integers(len(IMAGE_TEMPLATES)))) for d in image_digits]
    audio_texts = [audio_caption(int(d), int(rng.integers(len(AUDIO_TEMPLATES)))) for d in audio_digits]
    image_embeds = model.get_image_embeds(tensors.pixel_values[image_index])
    audio_embeds = model.get_audio_embeds(tensors.input_features[audio_index])
    texts = _tokenize(processor, image_texts + audio_texts)
    text_embeds = model.get_text_embeds(texts["input_ids"], texts["attention_mask"])
    count = len(image_texts)
    same_image = image_digits[:, None] == image_digits[None, :]
    same_audio = audio_digits[:, None] == audio_digits[None, :]
    cross = image_digits[:, None] == audio_digits[None, :]
    return (model.contrastive_loss(image_embeds, text_embeds[:count], same_image)
            + model.contrastive_loss(audio_embeds, text_embeds[count:], same_audio)
            + model.contrastive_loss(image_embeds, audio_embeds, cross))


def captioning_step_loss(model, table: CaptionTable, tensors: TaskTensors, image_index, audio_index):
    image_batch = table.batch("image", tensors.image_labels[image_index])
    audio_batch = table.batch("audio", tensors.audio_labels[audio_index])
    image_loss = model(**image_batch, pixel_values=tensors.pixel_values[image_index]).loss
    audio_loss = model(**audio_batch, input_features=tensors.input_features[audio_index]).loss
    return image_loss + audio_loss


def _sample_pairs(tensors: TaskTensors, batch_size: int, rng: np.random.Generator):
    """B random images and, for each, a random clip of the same digit."""
    image_index = torch.as_tensor(rng.choice(len(tensors.image_labels), batch_size, replace=False))
    by_digit = {d: np.flatnonzero(tensors.audio_labels.numpy() == d) for d in range(len(DIGIT_NAMES))}
    audio_index = torch.as_tensor([int(rng.choice(by_digit[int(d)])) for d in tensors.image_labels[image_index]])
    return image_index, audio_index


def learning_rate_at(step: int, total: int, args: MultimodalArguments) -> float:
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, processor, tensors: TaskTensors, args: MultimodalArguments, quiet: bool = False) -> list[dict]:
    """Both stages; returns the log history [{"step", "stage", "loss"}]."""
    rng = np.random.default_rng([args.seed, 7])
    table = CaptionTable(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    total = args.contrastive_steps + args.captioning_steps
    history, running = [], []
    model.train()
    progress = tqdm(range(total), desc="multimodal training", disable=quiet, file=sys.stderr)
    for step in progress:
        stage = "contrastive" if step < args.contrastive_steps else "captioning"
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, total, args)
        image_index, audio_index = _sample_pairs(tensors, args.batch_size, rng)
        if stage == "contrastive":
            loss = contrastive_step_loss(model, processor, tensors, image_index, audio_index, rng)
        else:
            loss = captioning_step_loss(model, table, tensors, image_index, audio_index)
            if args.captioning_contrastive_weight > 0:
                loss = loss + args.captioning_contrastive_weight * contrastive_step_loss(
                    model, processor, tensors, image_index, audio_index, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % args.logging_steps == 0 or step + 1 == total:
            history.append({"step": step + 1, "stage": stage, "loss": float(np.mean(running))})
            progress.set_postfix(stage=stage, loss=f"{history[-1]['loss']:.3f}")
            running = []
    model.eval()
    return history


@torch.no_grad()
def _embeds_in_batches(function, inputs, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([function(inputs[start:start + batch_size]) for start in range(0, inputs.shape[0], batch_size)])


@torch.no_grad()
def evaluate(model, processor, tensors: TaskTensors, max_caption_items: int | None = None) -> dict:
    """The five figures of the module docstring on one split."""
    model.eval()
    image_embeds = _embeds_in_batches(model.get_image_embeds, tensors.pixel_values)
    audio_embeds = _embeds_in_batches(model.get_audio_embeds, tensors.input_features)
    prompts = _tokenize(processor, [image_caption(d) for d in range(len(DIGIT_NAMES))])
    class_embeds = model.get_text_embeds(prompts["input_ids"], prompts["attention_mask"])
    zero_shot = (image_embeds @ class_embeds.T).argmax(-1)
    metrics = {"zero_shot_accuracy": float((zero_shot == tensors.image_labels).float().mean())}

    def retrieval(queries, query_labels, gallery, gallery_labels) -> float:
        best = (queries @ gallery.T).argmax(-1)
        return float((gallery_labels[best] == query_labels).float().mean())

    for name, queries, labels, captions in (("image", image_embeds, tensors.image_labels, tensors.image_captions),
                                            ("audio", audio_embeds, tensors.audio_labels, tensors.audio_captions)):
        texts = _tokenize(processor, captions)
        text_embeds = torch.cat([model.get_text_embeds(texts["input_ids"][s:s + 256],
                                                       texts["attention_mask"][s:s + 256])
                                 for s in range(0, len(captions), 256)])
        metrics[f"{name}_to_text_p_at_1"] = retrieval(queries, labels, text_embeds, labels)
    metrics["image_to_audio_p_at_1"] = retrieval(image_embeds, tensors.image_labels, audio_embeds,
                                                 tensors.audio_labels)
    metrics.update(caption_exact_match(model, processor, tensors, max_caption_items))
    return metrics


@torch.no_grad()
def caption_exact_match(model, processor, tensors: TaskTensors, max_items: int | None = None) -> dict:
    """Greedy captions from the chat prompt; exact match (after stripping spaces) with the canonical caption."""
    results = {}
    for modality, caption, labels, inputs, key in (
            ("image", image_caption, tensors.image_labels, tensors.pixel_values, "pixel_values"),
            ("audio", audio_caption, tensors.audio_labels, tensors.input_features, "input_features")):
        count = len(labels) if max_items is None else min(max_items, len(labels))
        prompt = chat_prompt(processor, modality)
        marker = processor.image_token if modality == "image" else processor.audio_token
        length = processor.image_seq_length if modality == "image" else processor.audio_seq_length
        prompt_ids = processor.tokenizer(prompt.replace(marker, marker * length), return_tensors="pt")["input_ids"]
        correct = 0
        for start in range(0, count, 128):
            stop = min(count, start + 128)
            ids = prompt_ids.expand(stop - start, -1)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                       **{key: inputs[start:stop]}, max_new_tokens=40, do_sample=False,
                                       pad_token_id=processor.tokenizer.pad_token_id)
            texts = processor.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
            correct += sum(text.strip() == caption(int(digit)) for text, digit in zip(texts, labels[start:stop]))
        results[f"{modality}_caption_exact_match"] = correct / count
    return results


def run(args: MultimodalArguments, quiet: bool = False, splits: dict | None = None) -> dict:
    """Build data and model, train both stages, evaluate on `eval_split`, save; returns the run summary."""
    os.makedirs(args.output_dir, exist_ok=True)
    splits = splits if splits is not None else build_splits(
        args.seed, args.test_fraction, args.dev_fraction, {"train": args.train_audio_clips})
    model, processor = build_model(args)
    rng = np.random.default_rng([args.seed, 11])
    train_tensors = TaskTensors(splits["train"], processor, rng)
    eval_tensors = TaskTensors(splits[args.eval_split], processor, rng)
    started = time.perf_counter()
    history = train(model, processor, train_tensors, args, quiet=quiet)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(model, processor, eval_tensors)
    summary = {
        "kind": "multimodal",
        "arguments": asdict(args),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
        "eval_split": args.eval_split,
        "eval": metrics,
        "split_sizes": {name: {"images": len(split.image_labels), "audio": len(split.audio_labels)}
                        for name, split in splits.items()},
        "log_history": history,
    }
    if args.save_model:
        model_dir = os.path.join(args.output_dir, "model")
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        summary["model_dir"] = model_dir
    atomic_write_text(os.path.join(args.output_dir, "run_summary.json"), json.dumps(summary, indent=2) + "\n")
    write_loss_plot(history, os.path.join(args.output_dir, "loss_curves.png"))
    return summary


def write_loss_plot(history: list[dict], path: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for stage in ("contrastive", "captioning"):
        points = [(entry["step"], entry["loss"]) for entry in history if entry["stage"] == stage]
        if points:
            axis.plot(*zip(*points), label=f"{stage} stage loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (InfoNCE sum; + caption cross-entropy in stage 2)")
    axis.set_title("multimodal ResoLLM training")
    axis.grid(alpha=0.3)
    axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def main(recipe: str | None, argv: list[str]) -> int:
    from ..training.arguments import parse_recipe

    (args,) = parse_recipe(ARGUMENT_TYPES, recipe, argv)
    summary = run(args)
    print(json.dumps({"eval_split": summary["eval_split"], **summary["eval"],
                      "train_seconds": round(summary["train_seconds"], 1)}, indent=2))
    return 0
