"""DynamicLoRA phase behaviour and stability detection (random tiny Llama, nothing downloaded).

1. Decay rate vs normalised importance: elements are given controlled importances (theta = 1, importance
   beta = 0, so I = |grad|), swept upward from FREE and downward from SCREENED; the applied per-step decay
   toward init is measured per element. The plot shows the sharp transition at tau (upward) and at
   0.8 tau (downward): the hysteresis loop.
2. Stability detection: the context tier is driven by a planted repeating update (fixed left subspace)
   or by random noise, for several autocorr_window values; reports detection rate and latency for the
   planted pattern and the false-positive rate (runs with any detection) for noise.

    python benchmarks/dynamic_lora_phases.py
    python benchmarks/dynamic_lora_phases.py --trials 10 --windows 8     # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import reso_hf  # noqa: E402
from dynamic_lora_common import RESULTS, markdown_table  # noqa: E402


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def decay_sweep(points: int = 400, tau: float = 1.5) -> dict:
    config = reso_hf.DynamicLoraConfig(
        target_modules=["q_proj"], tiers=["agent", "context"], tier_ranks={"agent": 2, "context": 8},
        tier_inertia={"agent": 0.0, "context": 0.0}, density_coupling=0.0, importance_beta=0.0,
        screening_threshold=tau, homeostasis_lower=0.0, homeostasis_upper=1.0, vertical_resonance=False,
        migration_enabled=False, layers_to_transform=[0], layers_pattern="layers")
    model = get_peft_model(tiny_model(), config)
    tuner = model.base_model
    layer = next(iter(tuner.adapter_layers().values()))
    factor = layer.dynamic_lora_A["default"]["context"]
    state = tuner.dynamics().module_states[next(iter(tuner.adapter_layers()))]["context"]
    init = state.tensors["init_A"]
    count = factor.numel()
    # normalised importance = |grad| / mean(|grad| over the tier): grads over [0, 3 mean] on A, B fixed at mean
    levels = torch.linspace(0.0, 3.0, count)
    curves = {}
    for direction, start in (("upward (from FREE)", 0.0), ("downward (from SCREENED)", 10.0)):
        with torch.no_grad():
            for tier in ("agent", "context"):
                for container in (layer.dynamic_lora_A, layer.dynamic_lora_B):
                    container["default"][tier].fill_(1.0)
                    container["default"][tier].grad = torch.ones_like(container["default"][tier])
            state.tensors["screened_A"].zero_()
            if start > 0:  # one step with huge importance screens every element of A first
                factor.grad = torch.full_like(factor, 1.0)
                factor.grad.view(-1)[: count // 2] = 50.0
                tuner.dynamic_step()
                state.tensors["screened_A"].fill_(True)
            for tier in ("agent", "context"):
                for container in (layer.dynamic_lora_A, layer.dynamic_lora_B):
                    container["default"][tier].fill_(1.0)
            mean_level = float(levels.mean())
            factor.grad = (levels / mean_level).view_as(factor).clone()
            layer.dynamic_lora_B["default"]["context"].grad.fill_(1.0)
        before = factor.detach().clone()
        tuner.dynamic_step()
        # every element had I = grad; the tier mean includes B (all 1): recompute the normalisation exactly
        importance = state.tensors["importance_A"].reshape(-1)
        total = importance.sum() + state.tensors["importance_B"].sum()
        normalised = importance / (total / (importance.numel() + state.tensors["importance_B"].numel()))
        rate = ((before - factor.detach()) / (before - init)).reshape(-1)
        order = torch.argsort(normalised)
        curves[direction] = {"importance": normalised[order].tolist(), "decay_rate": rate[order].tolist()}
    return {"tau": tau, "hysteresis_ratio": 0.8, "curves": curves}


def detection_trial(planted: bool, window: int, windows: int, seed: int) -> list[int]:
    config = reso_hf.DynamicLoraConfig(
        target_modules=["q_proj"], tiers=["agent", "context"], tier_ranks={"agent": 4, "context": 4},
        tier_inertia={"agent": 0.0, "context": 0.0}, density_coupling=0.0, vertical_resonance=False,
        autocorr_window=window)
    model = get_peft_model(tiny_model(), config)
    tuner = model.base_model
    layers = tuner.adapter_layers()
    generator = torch.Generator().manual_seed(seed)
    basis = {n: torch.linalg.qr(torch.randn(l.out_features, 2, generator=generator))[0] for n, l in layers.items()}
    detections = []
    for step in range(1, windows * window + 1):
        with torch.no_grad():
            for name, layer in layers.items():
                factor_b = layer.dynamic_lora_B["default"]["context"]
                if planted:
                    update = basis[name] @ torch.randn(2, factor_b.shape[1], generator=generator)
                else:
                    update = torch.randn(factor_b.shape, generator=generator)
                factor_b.add_(0.05 * update)
        metrics = tuner.dynamic_step(allow_missing_gradients=True)
        if metrics.get("patterns", {}).get("submitted"):
            detections.append(step)
    return detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window_sizes", type=int, nargs="*", default=[25, 50, 100])
    parser.add_argument("--output", default=str(RESULTS / "dynamic_lora_phases"))
    args = parser.parse_args()

    sweep = decay_sweep()
    up = sweep["curves"]["upward (from FREE)"]
    down = sweep["curves"]["downward (from SCREENED)"]

    def switch_point(curve):
        rates = curve["decay_rate"]
        for importance, rate in zip(curve["importance"], rates):
            if rate < 5e-3:
                return importance
        return float("nan")

    print(f"Decay rate vs normalised importance (tau = {sweep['tau']}, hysteresis 0.8 tau = {0.8 * sweep['tau']}):")
    print(markdown_table(["sweep", "decay below switch", "decay above switch", "switch at importance"],
                         [["upward (from FREE)", max(up["decay_rate"]), min(up["decay_rate"]), switch_point(up)],
                          ["downward (from SCREENED)", max(down["decay_rate"]), min(down["decay_rate"]),
                           switch_point(down)]]))

    stability_rows = []
    for window in args.window_sizes:
        planted_latency, planted_hits, noise_hits = [], 0, 0
        for trial in tqdm(range(args.trials), desc=f"detection window {window}", leave=False):
            found = detection_trial(True, window, args.windows, seed=trial)
            if found:
                planted_hits += 1
                planted_latency.append(found[0] / window)
            noise_hits += bool(detection_trial(False, window, args.windows, seed=10_000 + trial))
        stability_rows.append({
            "autocorr_window": window, "trials": args.trials, "windows_per_trial": args.windows,
            "planted_detection_rate": planted_hits / args.trials,
            "planted_first_detection_window": (sum(planted_latency) / len(planted_latency)) if planted_latency else None,
            "noise_false_positive_rate": noise_hits / args.trials,
        })
    print(f"\nStability detection (stable_windows = 3, threshold 0.7), {args.trials} trials x {args.windows} windows:")
    print(markdown_table(["autocorr_window", "planted detected", "first detection (window #)", "noise false positives"],
                         [[r["autocorr_window"], f"{100 * r['planted_detection_rate']:.0f}%",
                           r["planted_first_detection_window"], f"{100 * r['noise_false_positive_rate']:.0f}%"]
                          for r in stability_rows]))

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(sys.argv), "decay_sweep": sweep, "stability_detection": stability_rows}, indent=1))
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    axis.plot(up["importance"], up["decay_rate"], "-", color="tab:blue", label="upward sweep (from FREE)")
    axis.plot(down["importance"], down["decay_rate"], "--", color="tab:red", label="downward sweep (from SCREENED)")
    axis.axvline(sweep["tau"], color="grey", lw=0.8, ls=":")
    axis.axvline(0.8 * sweep["tau"], color="grey", lw=0.8, ls=":")
    axis.set_yscale("log")
    axis.set_xlabel("normalised importance  I / mean(I)")
    axis.set_ylabel("decay rate toward init per step")
    axis.set_title(f"SCREENED / FREE transition (tau = {sweep['tau']}, exit at 0.8 tau)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output.with_suffix(".png"), dpi=120)
    print(f"\nwrote {output.with_suffix('.json')} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
