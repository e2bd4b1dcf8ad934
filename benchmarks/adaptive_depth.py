"""Adaptive depth (issue 15): layers used per token vs held-out loss, and decode speed-up, on trained models.

    python benchmarks/adaptive_depth.py ../shared/data/guanaco/openassistant_best_replies_eval.jsonl [--quick]

Two ResoLLMs of the same size (default switches, `--layers` decoder layers) are trained with the same data, steps,
batches, optimizer and seed: "plain" (the language-model loss of the last layer only) and "layerskip" (the per-layer
early-exit losses, `adaptive_depth.loss_scale`, README "Adaptive depth"). The setup is quality.py's: the same rows,
10% held out by a seeded permutation, a byte-level BPE trained on the training rows, packed blocks.

For each model and entropy threshold tau (nats; 0 = full depth, inf = every token exits at `min_layers`):
- held-out loss (nats/token) of the early-exit logits, and mean layers used per scored token, from the whole-sequence
  pass (which decides exactly as cached decoding does, see tests/test_adaptive_depth.py);
- decode speed: greedy generation with the KV cache at batch 1, `--new_tokens` tokens after each of `--prompts`
  held-out prompts; tokens/s and its ratio to tau = 0 of the same model, measured interleaved (`--repeats` rounds,
  fastest round per setting: the least disturbed by other processes on a shared machine), with the mean layers
  used per generated token from `ResoGenerateOutput.layers_used`.

Writes benchmarks/results/adaptive_depth{,_quick}.{json,png} and prints the README table.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import reso_hf  # noqa: E402
from quality import RESULTS, blocks, split_rows  # noqa: E402

VARIANTS = ("plain", "layerskip")
# A fixed grid over [0, ln(vocab)] (ln 1024 = 6.9 nats), the same for both models: nothing is tuned on held-out data.
THRESHOLDS = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, math.inf)
DECODE_THRESHOLDS = THRESHOLDS
TRAIN_SECONDS = {}  # wall time of each variant's training (the per-layer losses cost extra head passes)


def build_model(args, tokenizer, variant: str):
    depth = dict(min_layers=args.min_layers, loss_scale=args.loss_scale if variant == "layerskip" else 0.0,
                 loss_weights="layerskip")
    config = reso_hf.tiny_config(vocab_size=len(tokenizer), num_hidden_layers=args.layers, use_cache=False,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, adaptive_depth=depth)
    return reso_hf.ResoLLMForCausalLM(config)


def train(args, tokenizer, train_blocks, variant: str):
    torch.manual_seed(args.seed)
    model = build_model(args, tokenizer, variant)
    training = TrainingArguments(
        output_dir=f"/tmp/adaptive_depth_bench/{variant}", max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20), weight_decay=0.1, max_grad_norm=1.0, logging_steps=max(1, args.steps // 5),
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=args.device == "cpu", seed=args.seed,
        disable_tqdm=True, dataloader_drop_last=True,
    )
    started = time.perf_counter()
    Trainer(model=model, args=training, train_dataset=train_blocks, data_collator=default_data_collator).train()
    TRAIN_SECONDS[variant] = time.perf_counter() - started
    print(f"  trained {variant}: {TRAIN_SECONDS[variant]:.0f} s", flush=True)
    model.config.use_cache = True
    return model.eval()


@torch.inference_mode()
def held_out_curve(model, held_out, args) -> list[dict]:
    """Per threshold: mean loss and mean layers used over the scored tokens (label != -100) of the held-out blocks."""
    rows = []
    batches = [default_data_collator([held_out[i] for i in range(start, min(start + args.batch_size, len(held_out)))])
               for start in range(0, len(held_out), args.batch_size)]
    for threshold in THRESHOLDS:
        loss_sum = layer_sum = count = 0.0
        for batch in batches:
            batch = {key: value.to(args.device) for key, value in batch.items()}
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        exit_entropy_threshold=threshold)
            logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
            scored = labels != -100
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                       ignore_index=-100, reduction="none").view(labels.shape)
            layers = (out.exit_layers[:, :-1] if out.exit_layers is not None
                      else torch.full_like(labels, model.config.num_hidden_layers))
            loss_sum += float(losses[scored].sum())
            layer_sum += float(layers[scored].sum())
            count += float(scored.sum())
        rows.append({"threshold": threshold, "held_out_loss": loss_sum / count, "layers_per_token": layer_sum / count})
    return rows


@torch.inference_mode()
def decode_speed(models: dict, prompts: list, args) -> dict:
    """tokens/s of greedy cached decoding per (model, threshold), interleaved over rounds; fastest round kept."""
    timings = {name: {str(t): [] for t in DECODE_THRESHOLDS} for name in models}
    layers = {name: {} for name in models}
    kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                  pad_token_id=0)
    for name, model in models.items():  # warm-up (allocations, first-call paths)
        model.generate(prompts[0], exit_entropy_threshold=math.inf, **kwargs)
    for _ in range(args.repeats):
        for name, model in models.items():
            for threshold in DECODE_THRESHOLDS:
                started = time.perf_counter()
                used = []
                for prompt in prompts:
                    out = model.generate(prompt, exit_entropy_threshold=threshold, return_dict_in_generate=True,
                                         **kwargs)
                    used += out.layers_used[0]
                elapsed = time.perf_counter() - started
                timings[name][str(threshold)].append(len(prompts) * args.new_tokens / elapsed)
                layers[name][str(threshold)] = sum(used) / len(used)
    result = {}
    for name in models:
        full = max(timings[name]["0.0"])
        result[name] = {str(t): {"tokens_per_s": max(timings[name][str(t)]), "rounds": timings[name][str(t)],
                                 "speedup_vs_full_depth": max(timings[name][str(t)]) / full,
                                 "layers_per_token": layers[name][str(t)]} for t in DECODE_THRESHOLDS}
    return result


def markdown_table(result: dict) -> str:
    layers = result["settings"]["layers"]
    lines = ["| model | tau (nats) | layers/token | held-out loss | decode tokens/s | speed-up vs full depth |",
             "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        for row in result["held_out"][name]:
            key = str(row["threshold"])
            speed = result["decode"][name].get(key)
            speed_text = (f"{speed['tokens_per_s']:.0f} ({speed['layers_per_token']:.2f} layers) | "
                          f"{speed['speedup_vs_full_depth']:.2f}x") if speed else "- | -"
            tau = "inf" if math.isinf(row["threshold"]) else f"{row['threshold']:g}"
            lines.append(f"| {name} | {tau} | {row['layers_per_token']:.2f} / {layers} | {row['held_out_loss']:.3f} | "
                         f"{speed_text} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in VARIANTS:
        rows = result["held_out"][name]
        curve.plot([r["layers_per_token"] for r in rows], [r["held_out_loss"] for r in rows], marker="o", label=name)
        for r in rows:
            curve.annotate("inf" if math.isinf(r["threshold"]) else f"{r['threshold']:g}",
                           (r["layers_per_token"], r["held_out_loss"]), fontsize=7, textcoords="offset points",
                           xytext=(3, 3))
        points = sorted((d["layers_per_token"], d["speedup_vs_full_depth"]) for d in result["decode"][name].values())
        speed.plot([x for x, _ in points], [y for _, y in points], marker="s", label=name)
    curve.set_xlabel("mean decoder layers used per token")
    curve.set_ylabel("held-out loss (nats/token)")
    curve.set_title("early exit: depth vs loss (labels: entropy threshold)")
    speed.set_xlabel("mean layers used per generated token")
    speed.set_ylabel("decode tokens/s relative to full depth")
    speed.set_title("cached greedy decoding, batch 1")
    for axis in (curve, speed):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)


def write_json(path: Path, content: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2) + "\n")  # inf thresholds are written as Infinity
    os.replace(temporary, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="guanaco-format jsonl (e.g. ../shared/data/guanaco/openassistant_best_replies_eval.jsonl)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--min_layers", type=int, default=2)
    parser.add_argument("--loss_scale", type=float, default=1.0, help="adaptive_depth.loss_scale of 'layerskip'")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_eval_blocks", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt_tokens", type=int, default=24)
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.block_size, args.batch_size, args.max_eval_blocks = 4, 32, 2, 4
        args.prompts, args.new_tokens, args.repeats = 1, 8, 1

    started = time.perf_counter()
    train_texts, held_out_texts = split_rows(args.data, 0)
    tokenizer = reso_hf.train_tokenizer(train_texts, args.vocab_size)
    train_blocks = blocks(train_texts, tokenizer, args.block_size)
    held_out = blocks(held_out_texts, tokenizer, args.block_size)
    held_out = held_out.select(range(min(len(held_out), args.max_eval_blocks)))
    prompts = [torch.tensor([row["input_ids"][: args.prompt_tokens]], device=args.device)
               for row in held_out.select(range(min(args.prompts, len(held_out))))]
    print(f"{len(train_blocks)} train blocks, {len(held_out)} held-out blocks of {args.block_size}; {args.steps} steps "
          f"x {args.batch_size}; {args.layers} layers, min_layers {args.min_layers}; "
          f"{torch.get_num_threads()} threads", flush=True)

    models = {variant: train(args, tokenizer, train_blocks, variant).to(args.device) for variant in VARIANTS}
    curves = {name: held_out_curve(model, held_out, args) for name, model in models.items()}
    decode = decode_speed(models, prompts, args)
    result = {
        "command": " ".join(sys.argv), "settings": vars(args), "thresholds": list(THRESHOLDS),
        "loss_weights": reso_hf.modeling.modeling_reso_llm.early_exit_loss_weights(
            args.layers, args.min_layers, args.loss_scale, "layerskip"),
        "data": {"train_rows": len(train_texts), "held_out_rows": len(held_out_texts),
                 "train_blocks": len(train_blocks), "held_out_blocks": len(held_out), "tokenizer_size": len(tokenizer)},
        "held_out": curves, "decode": decode, "train_seconds": TRAIN_SECONDS,
        "versions": {"torch": torch.__version__, "reso_hf": reso_hf.__version__},
        "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - started,
    }
    result["table"] = markdown_table(result)
    stem = RESULTS / ("adaptive_depth_quick" if args.quick else "adaptive_depth")
    write_json(stem.with_suffix(".json"), result)
    plot(result, stem.with_suffix(".png"))
    print(result["table"])
    print(f"wrote {stem.with_suffix('.json')} and .png ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
