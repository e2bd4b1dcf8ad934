"""Why does vertical resonance (SPEC §5.7) never act in the continual benchmark? Per-module cosines, measured.

The tuner computes, after every optimizer step and for each pair of neighbouring tiers (slow, fast), the cosine v
between the fast tier's realised update s_f (B'A' - BA) and the slow tier's dW = s_s B_s A_s in every adapted
module, and acts on the mean over modules: a conflict (v < -conflict_threshold, 0.3) damps the fast tier, an
alignment (EMA of v > vertical_threshold, 0.5) fast-tracks its migration. This script trains dynamic_on through
the tasks of benchmarks/continual.py (same arguments; use --split dev, never tune on the held-out parts) and
records every per-module cosine that dynamic_step() measured (`model.base_model.vertical_cosines()`, the values the
tuner averaged and acted on). It reports, per tier pair, the tuner's value (the mean over
modules) and the distribution of the per-module values against both thresholds.

    python benchmarks/continual_resonance.py --split dev --seq 96 --eval-examples 6

Writes benchmarks/results/continual_resonance.json and .png (atomically) and prints a markdown table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import continual  # noqa: E402
from dynamic_lora_common import RESULTS, markdown_table, with_ending  # noqa: E402


def module_cosines(model) -> dict[str, list[float]]:
    """{"slow->fast": [cosine per module]} of the step that dynamic_step() just ran, as the tuner measured them before
    acting on it (`DynamicLoraModel.vertical_cosines`; modules whose slow tier is still zero, or whose fast tier did
    not move, have no cosine)."""
    return {pair: list(values.values()) for pair, values in model.base_model.vertical_cosines().items()}


def summarise_pair(steps: list[list[float]], conflict: float, vertical: float) -> dict:
    """Per tier pair: the tuner's per-step value (mean over modules) and the per-module distribution."""
    means = [sum(v) / len(v) for v in steps if v]
    flat = torch.tensor([x for v in steps for x in v], dtype=torch.float64)
    if flat.numel() == 0:
        raise ValueError("no module had both a moving fast tier and a non-zero slow tier")
    quantiles = torch.quantile(flat, torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)).tolist()
    return {
        "steps": len(means),
        "tuner_mean_min": min(means),
        "tuner_mean_max": max(means),
        "module_values": int(flat.numel()),
        "module_q01": quantiles[0],
        "module_median": quantiles[1],
        "module_q99": quantiles[2],
        "module_abs_max": float(flat.abs().max()),
        "module_share_conflict": float((flat < -conflict).double().mean()),
        "module_share_aligned": float((flat > vertical).double().mean()),
    }


def plot(per_pair_values: dict[str, list[float]], conflict: float, vertical: float, path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, len(per_pair_values), figsize=(3.2 * len(per_pair_values), 3.2), sharey=True)
    for ax, (pair, values) in zip(axes, per_pair_values.items()):
        ax.hist(values, bins=60, range=(-1, 1), color="tab:blue")
        ax.axvline(-conflict, color="tab:red", ls="--", lw=0.8, label=f"conflict < -{conflict}")
        ax.axvline(vertical, color="tab:green", ls="--", lw=0.8, label=f"aligned > {vertical}")
        ax.set_yscale("log")
        ax.set_title(pair, fontsize=9)
        ax.set_xlabel("per-module cosine v")
    axes[0].set_ylabel("module-steps")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    continual.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = continual.parse_args(argv)  # the benchmark's own arguments; --methods is ignored (dynamic_on only)
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        args.out = RESULTS / "continual_resonance"
    base, description, pad_id, tasks, _ = continual.prepare(args)
    config = continual.dynamic_config(args)
    per_step: dict[str, list[list[float]]] = {}

    def record(model, task_name, step):
        for pair, values in module_cosines(model).items():
            per_step.setdefault(pair, []).append(values)

    result = continual.run_method("dynamic_on", base, tasks, args, pad_id, config.total_rank, after_dynamic_step=record)
    pairs = {pair: summarise_pair(steps, config.conflict_threshold, config.vertical_threshold)
             for pair, steps in per_step.items()}
    report = {
        "benchmark": "continual_resonance", "model": description, "split": args.split, "tasks": [t["name"] for t in tasks],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "conflict_threshold": config.conflict_threshold, "vertical_threshold": config.vertical_threshold,
        "pairs": pairs, "counters": result["dynamics"][-1]["counters"],
    }
    continual.atomic_write(with_ending(args.out, ".json"),
                           lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2), encoding="utf-8"))
    plot({pair: [x for v in steps for x in v] for pair, steps in per_step.items()}, config.conflict_threshold,
         config.vertical_threshold, with_ending(args.out, ".png"),
         f"Vertical resonance: per-module cosines over {pairs[next(iter(pairs))]['steps']} steps ({args.split} split)")
    headers = ["tier pair", "tuner value min", "tuner value max", "module q01", "module median", "module q99",
               "module |v| max", "share v < -conflict", "share v > vertical"]
    rows = [[pair, s["tuner_mean_min"], s["tuner_mean_max"], s["module_q01"], s["module_median"], s["module_q99"],
             s["module_abs_max"], s["module_share_conflict"], s["module_share_aligned"]] for pair, s in pairs.items()]
    print(markdown_table(headers, rows))
    print(f"wrote {with_ending(args.out, '.json')}")
    return report


if __name__ == "__main__":
    main()
