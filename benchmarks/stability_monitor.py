"""Benchmark 4 of issue 3: the predictive stability monitor.

Same briefly trained tiny ResoLLM as stochastic_resonance.py. Two parts:

1. Prediction. Sampled generations (temperatures 0.7, 1.0, 1.3; seeds 0..`--seeds`-1) with telemetry
   only (stability.enabled=False: no stopping, no temperature change), over the human turns of the
   bundled sample. An *onset* is a step whose class is `divergent` while the previous step's was not
   (steps with a valid λ only). A prediction is a `predicted_divergent` warning. Precision: fraction of
   predictions followed by an onset within `predictive_horizon` steps. Recall: fraction of onsets
   preceded by a prediction within `predictive_horizon` steps (the onset step excluded). Baseline: the
   naive predictor "λ ≥ 0 now (critical)" under the same scoring.
2. Auto temperature. Sampling at temperature 0.7 with stability.enabled=True (auto temperature and the
   divergence stop) vs telemetry only; 4-gram repetition rate, distinct-2 and length.

    python benchmarks/stability_monitor.py            # writes results/stability_monitor.{json,png}
"""

import argparse
import statistics

import torch

from _generation_common import RESULTS, brief_model, distinct_n, human_prompts, repetition_rate, save_figure, write_json
from reso_hf.modeling.generation_reso_llm import MIN_LYAPUNOV_POINTS, classify_stability

TEMPERATURES = (0.7, 1.0, 1.3)


def sample(model, ids, new_tokens, temperature, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=True, temperature=temperature, top_k=0,
                              pad_token_id=0, return_dict_in_generate=True)


def score_predictions(lyapunov_trace, predicted_steps, threshold, horizon, naive=False):
    classes = [classify_stability(v, threshold) for v in lyapunov_trace]
    first_valid = MIN_LYAPUNOV_POINTS  # λ is 0 (no estimate) before this step
    onsets = [t for t in range(first_valid + 1, len(classes))
              if classes[t] == "divergent" and classes[t - 1] != "divergent"]
    if naive:
        predicted_steps = [t for t in range(first_valid, len(classes)) if classes[t] == "critical"]
    true_positive = sum(any(p < o <= p + horizon for o in onsets) for p in predicted_steps)
    caught = sum(any(o - horizon <= p < o for p in predicted_steps) for o in onsets)
    return len(predicted_steps), true_positive, len(onsets), caught


def run(args) -> dict:
    model, tokenizer, train_info = brief_model(log=print)
    config = model.config
    threshold, horizon = config.stability.lyapunov_threshold, config.stability.predictive_horizon
    prompts = human_prompts(args.prompts)
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]

    counts = {"monitor": [0, 0, 0, 0], "naive_critical": [0, 0, 0, 0]}
    per_temperature = {}
    class_share = {c: 0 for c in ("collapsed", "stable", "critical", "divergent")}
    config.stability.enabled = False
    for temperature in TEMPERATURES:
        local = {"monitor": [0, 0, 0, 0], "naive_critical": [0, 0, 0, 0]}
        for ids in encoded:
            for seed in range(args.seeds):
                out = sample(model, ids, args.new_tokens, temperature, seed)
                trace = out.lyapunov_trace[0]
                predicted = [w["step"] for w in out.warnings[0] if w["type"] == "predicted_divergent"]
                for name, naive in (("monitor", False), ("naive_critical", True)):
                    result = score_predictions(trace, predicted, threshold, horizon, naive)
                    local[name] = [a + b for a, b in zip(local[name], result)]
                for value in trace[MIN_LYAPUNOV_POINTS:]:
                    class_share[classify_stability(value, threshold)] += 1
        for name in counts:
            counts[name] = [a + b for a, b in zip(counts[name], local[name])]
        per_temperature[str(temperature)] = {name: _rates(local[name]) for name in local}
        print(f"  temperature {temperature}: monitor {per_temperature[str(temperature)]['monitor']}")
    prediction = {name: _rates(values) for name, values in counts.items()}

    auto = {}
    for label, enabled in (("telemetry_only", False), ("auto_temperature", True)):
        config.stability.enabled = enabled
        reps, distincts, lengths, final_temps = [], [], [], []
        for ids in encoded:
            for seed in range(args.seeds):
                out = sample(model, ids, args.new_tokens, 0.7, seed)
                tokens = out.sequences[0, ids.shape[1]:ids.shape[1] + out.tokens_generated[0]].tolist()
                reps.append(repetition_rate(tokens))
                distincts.append(distinct_n(tokens))
                lengths.append(len(tokens))
                final_temps.append(out.temperature_trace[0][-1])
        auto[label] = {"repetition": statistics.mean(reps), "distinct2": statistics.mean(distincts),
                       "mean_length": statistics.mean(lengths), "mean_final_temperature": statistics.mean(final_temps)}
    config.stability.enabled = False
    total = sum(class_share.values()) or 1
    return {"model": train_info, "new_tokens": args.new_tokens, "prompts": len(prompts), "seeds": args.seeds,
            "temperatures": list(TEMPERATURES), "lyapunov_threshold": threshold, "predictive_horizon": horizon,
            "window_size": config.stability.window_size,
            "class_share": {c: n / total for c, n in class_share.items()},
            "prediction": prediction, "prediction_per_temperature": per_temperature, "auto_temperature": auto}


def _rates(values):
    predictions, true_positive, onsets, caught = values
    return {"predictions": predictions, "true_positive": true_positive, "onsets": onsets, "caught": caught,
            "precision": true_positive / predictions if predictions else None,
            "recall": caught / onsets if onsets else None}


def _fmt(value):
    return "n/a" if value is None else f"{value:.3f}"


def table(result) -> str:
    lines = ["| predictor | predictions | onsets of divergent | precision | recall |", "|---|---|---|---|---|"]
    for name, label in (("monitor", "monitor (linear extrapolation of λ)"), ("naive_critical", "naive: class critical now")):
        r = result["prediction"][name]
        lines.append(f"| {label} | {r['predictions']} | {r['onsets']} | {_fmt(r['precision'])} | {_fmt(r['recall'])} |")
    lines += ["", "| sampling T=0.7 | 4-gram repetition | distinct-2 | mean length | mean final temperature |",
              "|---|---|---|---|---|"]
    for name, r in result["auto_temperature"].items():
        lines.append(f"| {name} | {r['repetition']:.3f} | {r['distinct2']:.3f} | {r['mean_length']:.1f} | "
                     f"{r['mean_final_temperature']:.3f} |")
    shares = ", ".join(f"{c} {s:.1%}" for c, s in result["class_share"].items())
    lines += ["", f"class share over all steps with a valid λ: {shares}"]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    temps = result["temperatures"]
    for name, marker in (("monitor", "o"), ("naive_critical", "s")):
        for metric, style in (("precision", "-"), ("recall", "--")):
            values = [result["prediction_per_temperature"][str(t)][name][metric] for t in temps]
            axes[0].plot(temps, [v if v is not None else float("nan") for v in values], style, marker=marker,
                         label=f"{name} {metric}")
    axes[0].set_xlabel("sampling temperature")
    axes[0].set_title(f"predicting divergent within {result['predictive_horizon']} steps")
    axes[0].legend(fontsize=7)
    names = list(result["auto_temperature"])
    axes[1].bar(names, [result["auto_temperature"][n]["repetition"] for n in names])
    axes[1].set_title("4-gram repetition at T=0.7")
    figure.suptitle("Predictive stability monitor on a briefly trained tiny ResoLLM")
    save_figure(figure, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    write_json(RESULTS / "stability_monitor.json", result)
    plot(result, RESULTS / "stability_monitor.png")


if __name__ == "__main__":
    main()
