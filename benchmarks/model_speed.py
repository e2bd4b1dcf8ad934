"""ResoLLM vs LlamaForCausalLM of the same dimensions, side by side in one run (float32, CPU by default).

Measures, per variant: training step (forward + backward + AdamW step), prefill (forward, no grad),
decode tokens/s (greedy, KV cache, exactly `--new_tokens` tokens, batch 1) and peak memory of a
training step (peak RSS growth over the step, a fresh subprocess per variant).
Timings are interleaved across variants and reported as medians, so machine noise hits all alike.

    python benchmarks/model_speed.py                 # small_config() dimensions
    python benchmarks/model_speed.py --preset tiny --repeats 3   # quick look
    python benchmarks/model_speed.py --preset smollm2 --variants llama reso_converted reso_all_off \
        --batch_size 2 --seq_len 128 --repeats 3 --output benchmarks/results/model_speed_smollm2.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import reso_hf

RESULTS = Path(__file__).parent / "results"
CORE_OFF = dict(prime_embedding=False, rope_spectrum="geometric", kuramoto=False, coherence_gating=False)
VARIANTS = {
    "llama": None,
    "reso_all_on": dict(prime_embedding=True, rope_spectrum="golden", kuramoto=True, coherence_gating=True),
    "reso_all_off": CORE_OFF,
    "reso_prime_only": {**CORE_OFF, "prime_embedding": True},
    "reso_golden_only": {**CORE_OFF, "rope_spectrum": "golden"},
    "reso_kuramoto_only": {**CORE_OFF, "kuramoto": True},
    "reso_gating_only": {**CORE_OFF, "coherence_gating": True},
    # What `reso-hf convert` makes of a Llama (identity-initialised components, the source's geometric spectrum).
    "reso_converted": dict(prime_embedding=True, rope_spectrum="geometric", kuramoto=True, coherence_gating=True,
                           kuramoto_keeps_position=True, coherence_gate_normalized=True),
}


def smollm2_config(**overrides) -> reso_hf.ResoLLMConfig:
    """SmolLM2-135M's dimensions (random weights, no download)."""
    return reso_hf.ResoLLMConfig(**{**dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5), **overrides})


PRESETS = {"tiny": reso_hf.tiny_config, "small": reso_hf.small_config, "medium": reso_hf.medium_config,
           "smollm2": smollm2_config}


def build(variant: str, preset: str, device: str):
    reso_config = PRESETS[preset]()
    torch.manual_seed(0)
    if VARIANTS[variant] is None:
        config = LlamaConfig(
            vocab_size=reso_config.vocab_size, hidden_size=reso_config.hidden_size,
            intermediate_size=reso_config.intermediate_size, num_hidden_layers=reso_config.num_hidden_layers,
            num_attention_heads=reso_config.num_attention_heads,
            num_key_value_heads=reso_config.num_key_value_heads,
            max_position_embeddings=reso_config.max_position_embeddings, rms_norm_eps=reso_config.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": reso_config.rope_theta}, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        model = LlamaForCausalLM(config)
    else:
        model = reso_hf.ResoLLMForCausalLM(PRESETS[preset](**VARIANTS[variant]))
    model.config._attn_implementation = "sdpa"
    return model.to(device)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_train_step(model, optimizer, batch, device) -> float:
    model.train()
    _sync(device)
    start = time.perf_counter()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_prefill(model, batch, device) -> float:
    model.eval()
    _sync(device)
    start = time.perf_counter()
    model(input_ids=batch, use_cache=True)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def decode_tokens_per_second(model, prompt, new_tokens, device) -> float:
    model.eval()
    _sync(device)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _sync(device)
    return new_tokens / (time.perf_counter() - start)


@torch.no_grad()
def decode_kernels_per_token(model, prompt) -> int:
    """Top-level aten ops of one cached decode step (batch 1). On a CPU these small kernels, not the arithmetic, set
    the decode speed of a model this size; the count is exact where the timings are noisy."""
    from torch.profiler import ProfilerActivity, profile

    model.eval()
    outputs = model(prompt, use_cache=True)
    next_token = outputs.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        model(next_token, past_key_values=outputs.past_key_values, use_cache=True)
    return sum(1 for event in profiler.events() if event.name.startswith("aten::")
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def peak_memory_mb(variant: str, args) -> float:
    """Peak RSS growth of one training step, measured in a fresh process."""
    command = [sys.executable, __file__, "--measure_memory_of", variant, "--preset", args.preset,
               "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len), "--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def _measure_memory_child(args):
    model = build(args.measure_memory_of, args.preset, args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        time_train_step(model, optimizer, batch, args.device)
        print(torch.cuda.max_memory_allocated() / 2**20)
        return
    # ru_maxrss survives fork+exec (it would report the parent's peak); VmHWM belongs to this process image.
    before = _proc_status_mb("VmRSS")
    for _ in range(2):
        time_train_step(model, optimizer, batch, args.device)
    print(_proc_status_mb("VmHWM") - before)


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (peak memory on CPU needs Linux)")


def run(args) -> dict:
    device = args.device
    models = {name: build(name, args.preset, device) for name in args.variants}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    vocab = next(iter(models.values())).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=generator).to(device)

    timings = {name: {"train_step_s": [], "prefill_s": [], "decode_tok_s": []} for name in models}
    for name, model in models.items():  # warm-up: allocator, kernels, generate set-up
        time_train_step(model, optimizers[name], batch, device)
        time_prefill(model, batch, device)
        decode_tokens_per_second(model, prompt, 8, device)
    for _ in tqdm(range(args.repeats), desc="interleaved repeats"):
        for name, model in models.items():
            timings[name]["train_step_s"].append(time_train_step(model, optimizers[name], batch, device))
            timings[name]["prefill_s"].append(time_prefill(model, batch, device))
            timings[name]["decode_tok_s"].append(decode_tokens_per_second(model, prompt, args.new_tokens, device))

    rows = {}
    for name, model in models.items():
        rows[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "decode_kernels_per_token": decode_kernels_per_token(model, prompt),
            **{metric: statistics.median(values) for metric, values in timings[name].items()},
        }
    if not args.skip_memory:
        for name in tqdm(models, desc="peak memory (subprocesses)"):
            rows[name]["peak_train_memory_mb"] = peak_memory_mb(name, args)
    reference = rows["llama"]
    for row in rows.values():
        row["train_step_ratio_vs_llama"] = row["train_step_s"] / reference["train_step_s"]
        row["prefill_ratio_vs_llama"] = row["prefill_s"] / reference["prefill_s"]
        row["decode_ratio_vs_llama"] = row["decode_tok_s"] / reference["decode_tok_s"]
    return rows


def print_table(rows: dict) -> str:
    header = (f"| variant | params | train step (ms) | x Llama | prefill (ms) | x Llama | decode tok/s | "
              f"x Llama | kernels / token | peak train mem (MB) |")
    lines = [header, "|" + "---|" * 10]
    for name, row in rows.items():
        memory = f"{row['peak_train_memory_mb']:.0f}" if "peak_train_memory_mb" in row else "n/a"
        lines.append(
            f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['train_step_s'] * 1e3:.1f} | "
            f"{row['train_step_ratio_vs_llama']:.2f} | {row['prefill_s'] * 1e3:.1f} | "
            f"{row['prefill_ratio_vs_llama']:.2f} | {row['decode_tok_s']:.0f} | {row['decode_ratio_vs_llama']:.2f} | "
            f"{row.get('decode_kernels_per_token', 'n/a')} | {memory} |"
        )
    table = "\n".join(lines)
    print(table)
    return table


def plot(rows: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    metrics = [("train_step_ratio_vs_llama", "training step time (x Llama, lower is better)", 1.15),
               ("decode_ratio_vs_llama", "decode tokens/s (x Llama, higher is better)", 0.9)]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, (metric, label, target) in zip(axes, metrics):
        axis.barh(names, [rows[n][metric] for n in names], color=["grey"] + ["tab:blue"] * (len(names) - 1))
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.axvline(target, color="tab:red", linestyle="--", label=f"target {target}")
        axis.set_xlabel(label)
        axis.legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "model_speed.json"))
    parser.add_argument("--measure_memory_of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory_of:
        _measure_memory_child(args)
        return
    if "llama" not in args.variants:
        args.variants = ["llama", *args.variants]

    rows = run(args)
    table = print_table(rows)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("measure_memory_of", "output")}
    environment = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    payload = {"settings": settings, "environment": environment, "results": rows, "table_markdown": table}
    temporary = output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    os.replace(temporary, output)
    plot(rows, output.with_suffix(".png"), f"ResoLLM vs Llama, {args.preset} dims, {args.device}, float32")
    print(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
