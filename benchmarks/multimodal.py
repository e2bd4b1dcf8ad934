"""Multimodal ResoLLM (issue 16) on held-out digits + DTMF tones, against the same-size model without prime codes.

    python benchmarks/multimodal.py [--quick]

Both variants are trained by `reso_hf.multimodal.training` with the recipe recipes/multimodal/digits_dtmf.yaml
(same splits, seed, steps and batches); they differ only in `--prime_codes`: true = prime token codes
(`text_config.prime_embedding`) plus the image and audio prime bands (`modality_prime_codes`), false = neither
(`W_p` is absent, so the ablation has prime_code_dim x hidden_size fewer parameters: 4,096 of ~0.55M).

Figures on the held-out test split (20% of the 1,797 digit images per digit: 359 images; 359 generated clips from
their own random stream): zero-shot digit accuracy (class prompts "a handwritten {digit}"), image->text and
audio->text retrieval P@1, image->audio retrieval P@1 and caption exact match; the dev split (10%) is reported
beside it (the recipe was chosen on dev). Training time is the wall time of both stages on this machine.

Writes benchmarks/results/multimodal{,_quick}.{json,png} and prints the README table.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from reso_hf.dynamic_lora.serialization import atomic_write_bytes, atomic_write_text  # noqa: E402
from reso_hf.multimodal.data import build_splits  # noqa: E402
from reso_hf.multimodal.training import (  # noqa: E402
    ARGUMENT_TYPES,
    TaskTensors,
    build_model,
    evaluate,
    train,
)
from reso_hf.training.arguments import parse_recipe  # noqa: E402

RESULTS = HERE / "results"
RECIPE = HERE.parent / "recipes/multimodal/digits_dtmf.yaml"
METRICS = ("zero_shot_accuracy", "image_to_text_p_at_1", "audio_to_text_p_at_1", "image_to_audio_p_at_1",
           "image_caption_exact_match", "audio_caption_exact_match")
GOALS = {"zero_shot_accuracy": 0.9, "image_to_text_p_at_1": 0.9, "audio_to_text_p_at_1": 0.9}
VARIANTS = {"ResoLLM + prime bands": True, "no prime codes (ablation)": False}


def run_variant(args, splits, quiet: bool) -> dict:
    model, processor = build_model(args)
    rng = np.random.default_rng([args.seed, 11])
    train_tensors = TaskTensors(splits["train"], processor, rng)
    evaluation = {name: TaskTensors(splits[name], processor, rng) for name in ("dev", "test")}
    started = time.perf_counter()
    history = train(model, processor, train_tensors, args, quiet=quiet)
    seconds = time.perf_counter() - started
    return {"train_seconds": seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": history[-1]["loss"], "log_history": history,
            **{name: evaluate(model, processor, tensors) for name, tensors in evaluation.items()}}


def table(results: dict) -> str:
    names = list(VARIANTS)
    lines = [f"| metric (test split) | {names[0]} | {names[1]} | ratio | goal |", "|---|---|---|---|---|"]
    for metric in METRICS:
        a, b = (results["variants"][name]["test"][metric] for name in names)
        ratio = f"{a / b:.3f}" if b > 0 else "n/a"
        goal = f">= {GOALS[metric]} ({'met' if a >= GOALS[metric] else 'missed'})" if metric in GOALS else ""
        lines.append(f"| {metric} | {a:.3f} | {b:.3f} | {ratio} | {goal} |")
    a, b = (results["variants"][name]["train_seconds"] for name in names)
    lines.append(f"| training time (s) | {a:.0f} | {b:.0f} | {a / b:.3f} | < 1800 ({'met' if a < 1800 else 'missed'}) |")
    lines.append("")
    lines.append("dev split: " + "; ".join(
        f"{name}: " + ", ".join(f"{metric} {results['variants'][name]['dev'][metric]:.3f}" for metric in METRICS)
        for name in names))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, losses) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.38
    positions = np.arange(len(METRICS))
    for offset, name in enumerate(VARIANTS):
        values = [results["variants"][name]["test"][metric] for metric in METRICS]
        bars.bar(positions + (offset - 0.5) * width, values, width, label=name)
        history = results["variants"][name]["log_history"]
        losses.plot([e["step"] for e in history], [e["loss"] for e in history], label=name)
    bars.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="goal 0.9")
    bars.set_xticks(positions, [m.replace("_", "\n", 2) for m in METRICS], fontsize=7)
    bars.set_ylim(0, 1.05)
    bars.set_title("held-out test split")
    bars.legend(fontsize=7)
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("training loss")
    losses.set_title("training (contrastive, then captioning + contrastive)")
    losses.grid(alpha=0.3)
    losses.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(str(path), buffer.getvalue())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on small splits (under a minute)")
    parser.add_argument("--seed", type=int, default=0, help="seed of splits, initialisation and batches")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    options = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    (args,) = parse_recipe(ARGUMENT_TYPES, str(RECIPE), ["--seed", str(options.seed), "--save_model", "false"])
    audio_counts = {"train": args.train_audio_clips}
    if options.quick:
        args = replace(args, contrastive_steps=20, captioning_steps=10, batch_size=32, logging_steps=5)
        audio_counts = {"train": 200, "dev": 40, "test": 40}
    splits = build_splits(args.seed, args.test_fraction, args.dev_fraction, audio_counts)
    if options.quick:
        for split in splits.values():
            keep = slice(0, 200 if split is splits["train"] else 40)
            split.images, split.image_labels = split.images[keep], split.image_labels[keep]
    results = {"benchmark": "multimodal", "quick": options.quick, "recipe": str(RECIPE.relative_to(HERE.parent)),
               "arguments": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
               "split_sizes": {name: {"images": len(s.image_labels), "audio": len(s.audio_labels)}
                               for name, s in splits.items()},
               "variants": {}}
    for name, prime_codes in VARIANTS.items():
        print(f"== {name}", flush=True)
        results["variants"][name] = run_variant(replace(args, prime_codes=prime_codes), splits, options.quiet)
    suffix = "_quick" if options.quick else ""
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(str(RESULTS / f"multimodal{suffix}.json"), json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / f"multimodal{suffix}.png")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
