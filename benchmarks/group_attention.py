"""Group-structured attention (issue 15) against dense causal attention: held-out loss at an equal training budget,
and forward time at 2k and 8k tokens.

    python benchmarks/group_attention.py ../shared/data/guanaco/openassistant_best_replies_eval.jsonl [--quick]

Quality: quality.py's setup (the same rows, 10% held out by a seeded permutation, a byte-level BPE trained on the
training rows, packed blocks, Trainer's AdamW with warm-up and cosine decay). The `tiny` preset (4 heads, so the
auto primes are 2, 3, 5, 7) is trained with the same seeds, steps, batches and tokens (three seeds by default):
dense causal attention, group attention with fixed primes, and with learned prime selection. Training runs on
sdpa with the dense group mask (flex attention has no backward on CPU).

Speed: one forward pass (no grad, batch 1) of the same preset at 2048 and 8192 tokens, fastest of `--repeats`:
dense sdpa (transformers' is_causal path), group mask through sdpa (a dense per-head boolean mask), group mask
through flex attention (block-sparse in residue-class order; compiled, the compile excluded, the block-mask build
included and also reported on its own), and flex with the plain causal mask (the flex kernel's own cost on this
machine). "attended pairs" is the share of causal (query, key) pairs the pattern keeps; "flex tiles" the share of
the causal 128x128 tiles flex computes. Writes benchmarks/results/group_attention{,_quick}.{json,png}.
`--speed_only` re-measures the forward times and keeps the quality runs already in the JSON.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import default_data_collator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import reso_hf  # noqa: E402
from quality import RESULTS, blocks, split_rows, training_arguments  # noqa: E402
from reso_hf.modeling.group_attention import attended_fraction, create_group_attention_mask, head_primes  # noqa: E402
from reso_hf.training.trainer import AtomicCheckpointTrainer  # noqa: E402

VARIANTS = {
    "dense causal": None,
    "group (fixed primes)": dict(enabled=True, learned_selection=False),
    "group (learned selection)": dict(enabled=True, learned_selection=True),
}


def make_config(group, vocab_size, max_positions, local_window, **ids):
    group = None if group is None else {**group, "local_window": local_window}
    return reso_hf.tiny_config(vocab_size=vocab_size, max_position_embeddings=max_positions, use_cache=False,
                               group_attention=group, **ids)


def train_one(name, seed, args, tokenizer, train, held_out) -> dict:
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    training = training_arguments(run_args, f"/tmp/group_attention_bench/{seed}", args.steps)
    training.eval_strategy = "no"
    torch.manual_seed(seed)
    config = make_config(VARIANTS[name], len(tokenizer), args.block_size, args.local_window,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = reso_hf.ResoLLMForCausalLM(config)
    trainer = AtomicCheckpointTrainer(model=model, args=training, train_dataset=train, eval_dataset=held_out,
                                      data_collator=default_data_collator)
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    loss = trainer.evaluate()["eval_loss"]
    row = {"held_out_loss": loss, "train_loss": trainer.state.log_history[-1].get("train_loss"),
           "train_seconds": elapsed}
    if VARIANTS[name] is not None and VARIANTS[name]["learned_selection"]:
        row["selection_weights_per_layer"] = [layer.self_attn.group_selection().tolist() for layer in model.model.layers]
        row["candidate_primes"] = sorted(set(head_primes(config)))
    print(f"  seed {seed}  {name:<28} held-out {loss:.4f}  ({elapsed:.0f} s)", flush=True)
    return row


def timed_forward(model, ids, repeats) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - started)
    return best


def measure_speed(args) -> dict:
    rows = {}
    for length in args.lengths:
        print(f"  forward at {length} tokens", flush=True)
        ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(0))
        settings = {
            "dense sdpa": (None, "sdpa"),
            "group mask, sdpa (dense mask)": (VARIANTS["group (fixed primes)"], "sdpa"),
            "group mask, flex (block-sparse)": (VARIANTS["group (fixed primes)"], "flex_attention"),
            "causal, flex": (None, "flex_attention"),
        }
        row = {}
        for name, (group, attn) in settings.items():
            torch.manual_seed(0)
            config = make_config(group, 1024, length, args.local_window)
            config._attn_implementation = attn
            model = reso_hf.ResoLLMForCausalLM(config).eval()
            if attn == "flex_attention":
                # A fresh compile per length: inductor's CPU flex template fails to build the dynamic-shape
                # recompile that a second length would trigger (C++ compile error, torch 2.13).
                torch._dynamo.reset()
                timed_forward(model, ids, 1)  # compiles flex (and the block-mask builder) for this shape
            row[name] = {"forward_s": timed_forward(model, ids, args.repeats)}
            print(f"    {name:<34} {row[name]['forward_s']:.3f} s", flush=True)
            if group is not None:
                primes = head_primes(config)
                row[name]["attended_pairs"] = attended_fraction(primes, args.local_window, length)
                embeds = torch.zeros(1, length, config.hidden_size)
                build_times = []
                for _ in range(2):  # the first call may recompile the block-mask builder for this closure
                    started = time.perf_counter()
                    mask = create_group_attention_mask(config, embeds, None, None, None)
                    build_times.append(time.perf_counter() - started)
                row[name]["mask_build_s"] = min(build_times)
                if attn == "flex_attention":
                    block_mask = mask.passes[0].mask
                    tiles = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks)[0].sum(-1).double()
                    per_side = -(-length // block_mask.BLOCK_SIZE[0])
                    causal_tiles = per_side * (per_side + 1) / 2
                    row[name]["flex_tiles"] = float(tiles.mean() / causal_tiles)
                    row[name]["flex_tiles_per_head"] = (tiles / causal_tiles).tolist()
                    row[name]["heads_in_residue_order"] = [
                        not torch.equal(order, torch.arange(length)) for order in mask.passes[0].query_order]
                del mask
            del model
        reference = row["dense sdpa"]["forward_s"]
        for name in row:
            row[name]["ratio_vs_dense_sdpa"] = row[name]["forward_s"] / reference
        rows[str(length)] = row
    return rows


def summarise(quality: dict, seeds: list[int]) -> dict:
    rows = {}
    for name, by_seed in quality.items():
        losses = [by_seed[str(s)]["held_out_loss"] for s in seeds]
        deltas = [loss - quality["dense causal"][str(s)]["held_out_loss"] for loss, s in zip(losses, seeds)]
        rows[name] = {"held_out_loss": losses, "delta_vs_dense": deltas, "mean_delta": sum(deltas) / len(deltas),
                      "lower_on_every_seed": all(d < 0 for d in deltas) if name != "dense causal" else None,
                      "train_seconds": max(by_seed[str(s)]["train_seconds"] for s in seeds)}
    return rows


def tables(result) -> str:
    seeds = result["settings"]["seeds"]
    lines = [f"| attention | held-out loss (seeds {', '.join(map(str, seeds))}) | mean Δ vs dense | lower on every "
             "seed | train time (slowest seed) |", "|---|---|---|---|---|"]
    for name, row in result["summary"].items():
        losses = " / ".join(f"{loss:.4f}" for loss in row["held_out_loss"])
        every = "—" if row["lower_on_every_seed"] is None else ("yes" if row["lower_on_every_seed"] else "no")
        lines.append(f"| {name} | {losses} | {row['mean_delta']:+.4f} | {every} | {row['train_seconds']:.0f} s |")
    lines += ["", "| tokens | attention | forward | vs dense sdpa | attended pairs | flex tiles | mask build |",
              "|---|---|---|---|---|---|---|"]
    for length, row in result["speed"].items():
        for name, cell in row.items():
            pairs = f"{cell['attended_pairs']:.3f}" if "attended_pairs" in cell else "1"
            tiles = f"{cell['flex_tiles']:.3f}" if "flex_tiles" in cell else "—"
            build = f"{cell['mask_build_s']:.2f} s" if "mask_build_s" in cell else "—"
            lines.append(f"| {length} | {name} | {cell['forward_s']:.3f} s | {cell['ratio_vs_dense_sdpa']:.2f}x | "
                         f"{pairs} | {tiles} | {build} |")
    return "\n".join(lines)


def plot(result, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, times) = plt.subplots(1, 2, figsize=(13, 4.5))
    summary = result["summary"]
    names = [n for n in summary if n != "dense causal"]
    losses.barh(names, [summary[n]["mean_delta"] for n in names],
                color=["tab:green" if summary[n]["lower_on_every_seed"] else "tab:red" for n in names])
    for index, name in enumerate(names):
        losses.scatter(summary[name]["delta_vs_dense"], [index] * len(summary[name]["delta_vs_dense"]), color="black",
                       s=12, zorder=3)
    losses.axvline(0, color="black", linewidth=0.8)
    losses.set_xlabel("held-out loss − dense causal (nats/token; dots: seeds; same steps/tokens)")
    losses.set_title("quality at equal budget")
    lengths = list(result["speed"])
    kinds = list(result["speed"][lengths[0]])
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        times.bar([i + k * width for i in range(len(lengths))],
                  [result["speed"][length][kind]["forward_s"] for length in lengths], width, label=kind)
    times.set_xticks([i + 0.4 - width / 2 for i in range(len(lengths))], [f"{length} tokens" for length in lengths])
    times.set_yscale("log")
    times.set_ylabel("forward time (s, batch 1, no grad)")
    times.set_title("forward time")
    times.legend(fontsize=8)
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)


def write_json(path: Path, content: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="guanaco-format jsonl")
    parser.add_argument("--quick", action="store_true", help="a smoke run (under a minute)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--local_window", type=int, default=32, help="group_attention.local_window of every run")
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_eval_blocks", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu"])
    parser.add_argument("--speed_only", action="store_true",
                        help="re-measure the forward times only, keeping the quality runs of the existing JSON")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.block_size, args.max_eval_blocks = 3, 2, 64, 2
        args.local_window, args.lengths, args.repeats, args.seeds = 8, [256], 1, [0]
    args.eval_points = 1  # read by quality.training_arguments
    args.seed = 0  # the split and tokenizer of quality.py's seed 0 for every run

    stem = RESULTS / ("group_attention_quick" if args.quick else "group_attention")
    if args.speed_only:
        result = json.loads(stem.with_suffix(".json").read_text())
        result["speed"] = measure_speed(args)
        result["speed_command"] = " ".join(sys.argv)
        return finish(result, stem)

    train_texts, held_out_texts = split_rows(args.data, 0)
    tokenizer = reso_hf.train_tokenizer(train_texts, args.vocab_size)
    train = blocks(train_texts, tokenizer, args.block_size)
    held_out = blocks(held_out_texts, tokenizer, args.block_size)
    held_out = held_out.select(range(min(len(held_out), args.max_eval_blocks)))
    print(f"{len(train)} train blocks, {len(held_out)} held-out blocks of {args.block_size}; {args.steps} steps x "
          f"{args.batch_size}; window {args.local_window}; seeds {args.seeds}; {torch.get_num_threads()} threads",
          flush=True)
    quality = {name: {} for name in VARIANTS}
    for seed in args.seeds:  # seeds outermost: a load change on the shared machine hits every variant alike
        for name in VARIANTS:
            quality[name][str(seed)] = train_one(name, seed, args, tokenizer, train, held_out)
    result = {"command": " ".join(sys.argv), "settings": vars(args), "quality": quality,
              "versions": {"torch": torch.__version__, "reso_hf": reso_hf.__version__},
              "threads": torch.get_num_threads()}
    result["summary"] = summarise(quality, args.seeds)
    result["speed"] = measure_speed(args)
    finish(result, stem)


def finish(result: dict, stem: Path) -> None:
    result["table"] = tables(result)
    write_json(stem.with_suffix(".json"), result)
    plot(result, stem.with_suffix(".png"))
    print(result["table"])
    print(f"wrote {stem.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
