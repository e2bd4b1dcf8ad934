"""Benchmark 2 of issue 3: stochastic resonance on prompts where greedy decoding loops.

A tiny ResoLLM trained briefly (300 AdamW steps, `_generation_common.brief_model`) on the bundled
guanaco sample, greedy decoding of `--new_tokens` tokens for the human turns of the sample. For each
prompt: distinct-2 and the 4-gram repetition rate of the generation, without stochastic resonance
and with it at several noise amplitudes (seeds 0..2, averaged). "Looping" prompts are those whose
plain greedy generation has a repetition rate >= 0.3; both that subset and all prompts are reported.

    python benchmarks/stochastic_resonance.py            # writes results/stochastic_resonance.{json,png}
"""

import argparse
import statistics

import torch

from _generation_common import RESULTS, brief_model, distinct_n, human_prompts, repetition_rate, save_figure, write_json

AMPLITUDES = (0.1, 0.5, 1.0)
SEEDS = (0, 1, 2)
LOOP_THRESHOLD = 0.3


def generate(model, ids, new_tokens, seed=None):
    kwargs = {} if seed is None else {"seed": seed}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def run(args) -> dict:
    model, tokenizer, train_info = brief_model(log=print)
    prompts = human_prompts(args.prompts)
    config = model.config
    rows = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        config.stochastic_resonance.enabled = False
        plain = generate(model, ids, args.new_tokens)
        row = {"prompt": index, "plain": {"distinct2": distinct_n(plain), "repetition": repetition_rate(plain)}}
        for amplitude in AMPLITUDES:
            config.stochastic_resonance.enabled = True
            config.stochastic_resonance.noise_amplitude = amplitude
            runs = [generate(model, ids, args.new_tokens, seed) for seed in SEEDS]
            row[f"sr_{amplitude}"] = {"distinct2": statistics.mean(distinct_n(r) for r in runs),
                                      "repetition": statistics.mean(repetition_rate(r) for r in runs)}
        config.stochastic_resonance.enabled = False
        rows.append(row)
        print(f"  prompt {index}: plain rep {row['plain']['repetition']:.2f} -> "
              + ", ".join(f"{a}: {row[f'sr_{a}']['repetition']:.2f}" for a in AMPLITUDES))
    looping = [r for r in rows if r["plain"]["repetition"] >= LOOP_THRESHOLD]
    variants = ["plain"] + [f"sr_{a}" for a in AMPLITUDES]
    summary = {}
    for subset_name, subset in (("looping", looping), ("all", rows)):
        summary[subset_name] = {
            v: {"distinct2": statistics.mean(r[v]["distinct2"] for r in subset) if subset else None,
                "repetition": statistics.mean(r[v]["repetition"] for r in subset) if subset else None}
            for v in variants
        }
        summary[subset_name]["count"] = len(subset)
    return {"model": train_info, "new_tokens": args.new_tokens, "escape_threshold":
            config.stochastic_resonance.escape_threshold, "repetition_window": config.stochastic_resonance.repetition_window,
            "amplitudes": list(AMPLITUDES), "seeds": list(SEEDS), "loop_threshold": LOOP_THRESHOLD,
            "summary": summary, "per_prompt": rows}


def table(result) -> str:
    lines = ["| subset | variant | distinct-2 | 4-gram repetition |", "|---|---|---|---|"]
    for subset in ("looping", "all"):
        data = result["summary"][subset]
        for variant in ["plain"] + [f"sr_{a}" for a in result["amplitudes"]]:
            name = "greedy" if variant == "plain" else f"greedy + SR (amplitude {variant[3:]})"
            if data[variant]["distinct2"] is None:
                continue
            lines.append(f"| {subset} ({data['count']}) | {name} | {data[variant]['distinct2']:.3f} | "
                         f"{data[variant]['repetition']:.3f} |")
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = ["plain"] + [f"sr_{a}" for a in result["amplitudes"]]
    labels = ["greedy"] + [f"SR {a}" for a in result["amplitudes"]]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for axis, metric, title in ((axes[0], "distinct2", "distinct-2 (higher = more varied)"),
                                (axes[1], "repetition", "4-gram repetition rate (lower = fewer loops)")):
        for offset, subset in ((-0.2, "looping"), (0.2, "all")):
            data = result["summary"][subset]
            if data["plain"][metric] is None:
                continue
            axis.bar([i + offset for i in range(len(variants))], [data[v][metric] for v in variants], width=0.4,
                     label=f"{subset} prompts ({data['count']})")
        axis.set_xticks(range(len(variants)), labels)
        axis.set_title(title)
        axis.legend()
    figure.suptitle("Stochastic resonance on a briefly trained tiny ResoLLM (greedy decoding)")
    save_figure(figure, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    write_json(RESULTS / "stochastic_resonance.json", result)
    plot(result, RESULTS / "stochastic_resonance.png")


if __name__ == "__main__":
    main()
