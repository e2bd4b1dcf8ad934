"""Benchmark 1 of issue 3 (generation side): cost of the telemetry and generation extensions.

Untrained models of `tiny_config()` dimensions (vocab 32000, hidden 128, 4 layers), float32 on CPU,
one thread. Variants, timed interleaved and reported as medians:

- `llama`: `LlamaForCausalLM` of the same dimensions, plain `generate`;
- `reso_plain`: ResoLLM, plain `generate` (telemetry off, extensions off);
- `reso_telemetry`: ResoLLM, `return_dict_in_generate=True` (ResoGenerateOutput with all traces);
- `reso_extensions`: ResoLLM with stability and stochastic resonance enabled, plus telemetry.

Decode tokens/s: greedy, batch 1, prompt `--prompt_tokens`, exactly `--new_tokens` new tokens (EOS off).
Training step: forward + backward + AdamW step on (8, 128) tokens; stability and stochastic resonance act
only in `generate`, so ResoLLM's training step is the same with them on or off (measured once).
Overhead ratio = tokens/s of reso_plain / tokens/s of the variant (target for telemetry: <= 1.10).

    python benchmarks/generation_overhead.py       # writes results/generation_overhead.{json,png}
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reso_hf
from _generation_common import RESULTS, save_figure, write_json

VARIANTS = ("llama", "reso_plain", "reso_telemetry", "reso_extensions")


def build():
    reso_config = reso_hf.tiny_config()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=reso_config.vocab_size, hidden_size=reso_config.hidden_size,
        intermediate_size=reso_config.intermediate_size, num_hidden_layers=reso_config.num_hidden_layers,
        num_attention_heads=reso_config.num_attention_heads, num_key_value_heads=reso_config.num_key_value_heads,
        max_position_embeddings=reso_config.max_position_embeddings, rms_norm_eps=reso_config.rms_norm_eps,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    reso = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config())
    torch.manual_seed(0)
    extended = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config(stability={"enabled": True},
                                                              stochastic_resonance={"enabled": True}))
    models = {"llama": llama, "reso_plain": reso, "reso_telemetry": reso, "reso_extensions": extended}
    for model in models.values():
        model.config._attn_implementation = "sdpa"
        model.generation_config.eos_token_id = None
        model.eval()
    return models


def decode_seconds(name, model, prompt, new_tokens) -> float:
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if name in ("reso_telemetry", "reso_extensions"):
        kwargs.update(return_dict_in_generate=True, seed=0)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    elapsed = time.perf_counter() - start
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    # reso_extensions may stop a divergent row early (stability stop): time per generated token.
    return elapsed / (sequences.shape[1] - prompt.shape[1]) * new_tokens


def train_seconds(model, batch) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(4):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 1:
            times.append(time.perf_counter() - start)
    model.eval()
    return statistics.median(times)


def run(args) -> dict:
    models = build()
    prompt = torch.randint(3, 32000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    for name in VARIANTS:  # warm-up
        decode_seconds(name, models[name], prompt, 8)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            times[name].append(decode_seconds(name, models[name], prompt, args.new_tokens))
    batch = torch.randint(3, 32000, (8, 128), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    # Extended mode in training: PRSC bank, goal prefix slots fed by goal dropout (one extra no-grad
    # forward for the answer's mean hidden state), memory orientation.
    extended_training = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config(
        agency={"enabled": True}, prsc={"enabled": True}, temporal_smf={"enabled": True}))
    training = {"llama": train_seconds(models["llama"], batch), "reso": train_seconds(models["reso_plain"], batch),
                "reso_extended": train_seconds(extended_training, batch)}
    rows = {}
    plain = statistics.median(times["reso_plain"])
    for name in VARIANTS:
        median = statistics.median(times[name])
        rows[name] = {"decode_tokens_per_s": args.new_tokens / median, "decode_seconds_median": median,
                      "decode_seconds_all": times[name], "slowdown_vs_reso_plain": median / plain}
    return {"config": "tiny_config() (vocab 32000, hidden 128, 4 layers, 4 heads, 2 kv heads)",
            "threads": torch.get_num_threads(), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "decode": rows,
            "train_step_seconds": training, "train_step_ratio_reso_vs_llama": training["reso"] / training["llama"],
            "train_step_ratio_extended_vs_llama": training["reso_extended"] / training["llama"]}


def table(result) -> str:
    lines = ["| variant | decode tokens/s | time vs reso_plain |", "|---|---|---|"]
    for name, row in result["decode"].items():
        lines.append(f"| {name} | {row['decode_tokens_per_s']:.1f} | {row['slowdown_vs_reso_plain']:.3f}x |")
    t = result["train_step_seconds"]
    lines += ["", "| model | training step (8x128) s | ratio vs llama |", "|---|---|---|",
              f"| llama | {t['llama']:.3f} | 1.00x |",
              f"| reso (telemetry/extensions do not change training) | {t['reso']:.3f} | "
              f"{result['train_step_ratio_reso_vs_llama']:.2f}x |",
              f"| reso extended (agency with goal dropout, PRSC, memory) | {t['reso_extended']:.3f} | "
              f"{result['train_step_ratio_extended_vs_llama']:.2f}x |"]
    return "\n".join(lines)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(result["decode"])
    axes[0].bar(names, [result["decode"][n]["decode_tokens_per_s"] for n in names])
    axes[0].set_title("greedy decode tokens/s (batch 1)")
    axes[0].tick_params(axis="x", labelsize=8)
    t = result["train_step_seconds"]
    axes[1].bar(list(t), list(t.values()))
    axes[1].set_title("training step seconds (8x128)")
    figure.suptitle("Generation telemetry overhead, tiny_config, CPU float32, 1 thread")
    save_figure(figure, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    print(table(result))
    write_json(RESULTS / "generation_overhead.json", result)
    plot(result, RESULTS / "generation_overhead.png")


if __name__ == "__main__":
    main()
