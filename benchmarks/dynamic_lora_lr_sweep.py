"""Learning-rate sweep: does DynamicLoRA's default config train wherever PEFT LoRA of the same total rank trains?

Every method fine-tunes the same frozen base (SmolLM2-135M-Instruct by default) on the bundled guanaco sample
(reso_hf/data/guanaco_sample.jsonl, assistant tokens only, the model's chat template) for --steps AdamW steps of
--batch x --seq tokens at a CONSTANT learning rate (no warm-up, gradient norm clipped at 1.0, weight decay 0), once
per learning rate of --lrs, from the same seed and the same batches. Methods (--methods):

  lora                       PEFT LoRA, r = the DynamicLoRA total rank, lora_alpha = r (scaling 1), same modules;
  dynamic_default            DynamicLoraConfig with its defaults (dynamics on: dynamic_step() after every step);
  dynamic_largest_rank_alpha the previous default: alpha = the largest tier rank (s_t = 64 / rank_t);
  dynamic_unit_scaling       s_t = 1 for every tier (tier_alpha = rank): the adapter is exactly a rank-R LoRA
                             with scaling 1 when the dynamics are off;
  dynamic_default_static, dynamic_largest_rank_alpha_static
                             the two scalings with dynamics_enabled=False (no inertia shrinking the steps).
--variant NAME='{"alpha": 8}' adds a DynamicLoRA method with those config overrides.

Reported per method and learning rate: the held-out loss (mean per labelled token over --eval-examples rows
that are never trained on) before and after; the mean training loss of the first and of the last 5 steps; and
"diverged": a non-finite loss, or a held-out loss after training above the loss before it.

    python benchmarks/dynamic_lora_lr_sweep.py                 # about 40 min on 2 CPU threads
    python benchmarks/dynamic_lora_lr_sweep.py --quick         # a smoke run (2 steps, 1 learning rate)
    python benchmarks/dynamic_lora_lr_sweep.py --model HuggingFaceTB/SmolLM2-135M-Instruct   # any Hub id/folder/.gguf

Writes benchmarks/results/dynamic_lora_lr_sweep[_quick].json and .png (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import reso_hf  # noqa: E402
from continual import atomic_write, collate, held_out_loss, load_tokenizer  # noqa: E402
from dynamic_lora_common import DEFAULT_MODEL, RESULTS, load_causal_lm, markdown_table, with_ending  # noqa: E402
from reso_hf.training.data import (  # noqa: E402
    IGNORE_INDEX,
    bundled_sample_path,
    parse_guanaco,
    read_jsonl_texts,
    resolve_chat_template,
    tokenize_messages,
)

DEFAULT_LRS = [1e-4, 2e-4, 5e-4, 1e-3]
DEFAULT_METHODS = ["lora", "dynamic_default", "dynamic_largest_rank_alpha"]
BUILTIN_VARIANTS = {
    "dynamic_default": {},
    "dynamic_largest_rank_alpha": {"alpha": "largest_rank"},
    "dynamic_unit_scaling": {"tier_alpha": "rank"},
    # dynamics_enabled=False (a static multi-tier LoRA): no inertia shrinks the steps, the worst case of a scaling
    "dynamic_default_static": {"dynamics_enabled": False},
    "dynamic_largest_rank_alpha_static": {"alpha": "largest_rank", "dynamics_enabled": False},
}


def dynamic_config(targets: list[str], overrides: dict) -> reso_hf.DynamicLoraConfig:
    config = reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=list(targets))
    overrides = dict(overrides)
    if overrides.get("alpha") == "largest_rank":
        overrides["alpha"] = float(max(config.rank_of(t) for t in config.tiers))
    if overrides.get("tier_alpha") == "rank":
        overrides["tier_alpha"] = {t: float(config.rank_of(t)) for t in config.tiers}
    for name, value in overrides.items():
        if not hasattr(config, name):
            raise ValueError(f"--variant: DynamicLoraConfig has no field {name!r}")
        setattr(config, name, value)
    config._validate()
    return config


def build_data(tokenizer, args) -> tuple[list, list]:
    """(train documents, held-out documents): (ids, labels) pairs cut to --seq tokens, fixed-seed split."""
    template = resolve_chat_template(tokenizer, "auto")
    conversations = [parse_guanaco(text) for text in read_jsonl_texts(bundled_sample_path())]
    random.Random(args.seed).shuffle(conversations)
    docs = []
    for messages in conversations:
        ids, labels = tokenize_messages(tokenizer, messages, template, assistant_only=True)
        ids, labels = ids[: args.seq], labels[: args.seq]
        if any(label != IGNORE_INDEX for label in labels):
            docs.append((ids, labels))
    held_out, train = docs[: args.eval_examples], docs[args.eval_examples:]
    if len(train) < args.batch:
        raise ValueError(f"only {len(train)} training rows left after {args.eval_examples} held-out rows")
    return train, held_out


def batches(train: list, args) -> list:
    """The same --steps batches for every method and learning rate (epochs reshuffled with a fixed seed)."""
    order = random.Random(args.seed + 1)
    pool, out = [], []
    for _ in range(args.steps):
        if len(pool) < args.batch:
            pool = list(train)
            order.shuffle(pool)
        out.append(pool[: args.batch])
        pool = pool[args.batch:]
    return out


def run(method: str, overrides: dict | None, lr: float, base, train_batches, held_out, pad_id, total_rank, args) -> dict:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    if method == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", r=total_rank, lora_alpha=total_rank, lora_dropout=0.0,
                            target_modules=list(args.targets))
        scalings = {"lora": 1.0}
    else:
        config = dynamic_config(args.targets, overrides)
        scalings = {t: config.scaling_of(t) for t in config.tiers}
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = held_out_loss(model, held_out, pad_id, args.eval_batch)
    losses, start = [], time.perf_counter()
    for step, docs in enumerate(train_batches):
        loss = model(**collate(docs, pad_id)).loss
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if method != "lora":
            model.base_model.dynamic_step(optimizer)
        optimizer.zero_grad(set_to_none=True)
    after = held_out_loss(model, held_out, pad_id, args.eval_batch) if math.isfinite(losses[-1]) else float("nan")
    wall = time.perf_counter() - start
    head, tail = losses[:5], losses[-5:]
    diverged = not all(math.isfinite(v) for v in losses) or not math.isfinite(after) or after > before
    return {"method": method, "lr": lr, "scalings": scalings, "held_out_before": before, "held_out_after": after,
            "train_first5": sum(head) / len(head), "train_last5": sum(tail) / len(tail), "train_losses": losses,
            "diverged": diverged, "wall_s": wall}


def plot(results: list[dict], path: Path, title: str) -> None:
    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in rows]
        after = [r["held_out_after"] if math.isfinite(r["held_out_after"]) else float("nan") for r in rows]
        line = left.plot(lrs, after, marker="o", label=method)[0]
        for r in rows:
            if r["diverged"]:
                left.scatter([r["lr"]], [min(r["held_out_after"], 20) if math.isfinite(r["held_out_after"]) else 20],
                             marker="x", s=90, color=line.get_color())
        worst = max(rows, key=lambda r: r["lr"])
        right.plot(range(1, len(worst["train_losses"]) + 1), worst["train_losses"], label=f"{method} lr {worst['lr']:g}",
                   color=line.get_color())
    left.axhline(results[0]["held_out_before"], color="grey", linestyle=":", label="before training")
    left.set_xscale("log")
    left.set_xlabel("learning rate")
    left.set_ylabel("held-out loss after training (x: diverged)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    right.set_xlabel("step")
    right.set_ylabel("training loss at the largest learning rate")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-gguf (default), a .gguf file, a folder or a Hub id")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, one learning rate, 4 held-out rows")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 30; quick 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="max tokens per example")
    parser.add_argument("--eval-examples", type=int, help="held-out rows (default 16; quick 4)")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--lrs", type=float, nargs="+", help=f"learning rates (default {DEFAULT_LRS}; quick [1e-3])")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                        help=f"from ['lora', {', '.join(repr(v) for v in BUILTIN_VARIANTS)}] and --variant names")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="a DynamicLoRA method with these config overrides, e.g. alpha8='{\"alpha\": 8}'")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"],
                        help="adapted modules (default: PEFT's LoRA default for Llama)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/dynamic_lora_lr_sweep[_quick])")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 30)
    args.eval_examples = args.eval_examples or (4 if args.quick else 16)
    args.lrs = args.lrs or ([1e-3] if args.quick else list(DEFAULT_LRS))
    args.out = args.out or RESULTS / ("dynamic_lora_lr_sweep" + ("_quick" if args.quick else ""))
    variants = dict(BUILTIN_VARIANTS)
    for spec in args.variant:
        name, _, payload = spec.partition("=")
        if not name or not payload:
            raise SystemExit(f"--variant must be NAME=JSON, got {spec!r}")
        variants[name] = json.loads(payload)
    unknown = [m for m in args.methods if m != "lora" and m not in variants]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; allowed: {['lora', *variants]}")
    args.variants = variants
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base, description = load_causal_lm(args.model)
    for p in base.parameters():
        p.requires_grad_(False)
    train, held_out = build_data(tokenizer, args)
    train_batches = batches(train, args)
    total_rank = dynamic_config(args.targets, {}).total_rank
    print(f"model {description}; {len(train)} train / {len(held_out)} held-out rows; total rank {total_rank}; "
          f"methods {args.methods}; learning rates {args.lrs}", flush=True)
    results = []
    report = {}
    for lr in args.lrs:  # every method at one learning rate before the next: --lrs 1e-3 ... shows the trap first
        for method in args.methods:
            result = run(method, args.variants.get(method), lr, base, train_batches, held_out, pad_id, total_rank, args)
            results.append(result)
            print(f"{method} lr {lr:g}: held-out {result['held_out_before']:.4f} -> {result['held_out_after']:.4f}, "
                  f"train {result['train_first5']:.4f} -> {result['train_last5']:.4f}, diverged {result['diverged']}, "
                  f"{result['wall_s']:.0f} s", flush=True)
            settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            report = {"benchmark": "dynamic_lora_lr_sweep", "model": description, "torch": torch.__version__,
                      "platform": platform.platform(), "settings": settings, "total_rank": total_rank,
                      "train_rows": len(train), "held_out_rows": len(held_out), "results": results}
            atomic_write(with_ending(args.out, ".json"),  # a crash loses no finished run
                         lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2, allow_nan=True), encoding="utf-8"))
    plot(results, with_ending(args.out, ".png"),
         f"{description}: {args.steps} steps x {args.batch} x {args.seq} tokens, constant lr, total rank {total_rank}")
    print(table(results, args.methods))
    return report


def table(results: list[dict], methods: list[str]) -> str:
    headers = ["method", "lr", "held-out before", "held-out after", "train first 5", "train last 5", "diverged"]
    ordered = sorted(results, key=lambda r: (methods.index(r["method"]), r["lr"]))
    rows = [[r["method"], f"{r['lr']:g}", r["held_out_before"], r["held_out_after"], r["train_first5"],
             r["train_last5"], "yes" if r["diverged"] else "no"] for r in ordered]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
