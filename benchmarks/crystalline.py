"""Crystalline components (issue 17) against their standard counterparts: held-out loss and step time.

    nice -n 10 python benchmarks/crystalline.py ../shared/data/guanaco/openassistant_best_replies_eval.jsonl [--quick]

or one seed per process, then merged (what produced results/crystalline.json):

    DATA=../shared/data/guanaco/openassistant_best_replies_eval.jsonl
    nice -n 10 python benchmarks/crystalline.py $DATA --seeds 0 --tag seed0 &
    nice -n 10 python benchmarks/crystalline.py $DATA --seeds 1 --tag seed1; wait
    nice -n 10 python benchmarks/crystalline.py $DATA --speed --tag speed   # step times, variants interleaved
    python benchmarks/crystalline.py --merge benchmarks/results/crystalline_seed{0,1}.json \
        benchmarks/results/crystalline_speed.json

The quality benchmark's setup (benchmarks/quality.py): the same rows, 10% held out by a seeded permutation (split
seed 0 for every run), a byte-level BPE trained on the training rows, packed blocks, a ResoLLM preset with
its default switches (the `tiny` preset by default: the shared machine is slow), Trainer's AdamW with warm-up,
weight decay 0.1 and clipping at 1. Every variant changes one
thing against the baseline (SiLU gate = SwiGLU, `initializer="normal"`, cosine schedule, no auxiliary loss) and is
trained with the same steps, batches and seeds (two seeds by default). Step time: the median wall time of one
optimizer step after the first, the fastest of each run (the least disturbed by other processes on a
shared machine; compare times within this file only).

An option "wins" when its held-out loss is below its counterpart's for every seed. Writes
benchmarks/results/crystalline{,_quick}.{json,png} and prints the README table.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, default_data_collator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import reso_hf  # noqa: E402
from dynamic_lora_common import with_ending  # noqa: E402
from quality import RESULTS, blocks, reso_model, split_rows, training_arguments  # noqa: E402
from reso_hf.modeling.crystalline import PLATONIC_SOLIDS  # noqa: E402
from reso_hf.training.auxiliary_losses import AuxiliaryLossArguments  # noqa: E402
from reso_hf.training.trainer import AtomicCheckpointTrainer  # noqa: E402

AUX_WEIGHT = 0.1
# name -> (config overrides, training-argument overrides, auxiliary loss weights, counterpart)
VARIANTS = {
    "baseline (silu, normal init, cosine, no aux)": ({}, {}, {}, None),
    "linear schedule": ({}, {"lr_scheduler_type": "linear"}, {}, None),
    **{f"hidden_act={solid}": ({"hidden_act": solid}, {}, {}, "baseline") for solid in PLATONIC_SOLIDS},
    "initializer=phi_harmonic": ({"initializer": "phi_harmonic"}, {}, {}, "baseline"),
    "lr_scheduler_type=phi": ({}, {"lr_scheduler_type": "phi", "lr_scheduler_kwargs": {"num_cycles": 3}}, {},
                              "baseline"),
    **{f"{name}_loss_weight={AUX_WEIGHT}": ({}, {}, {f"{name}_loss_weight": AUX_WEIGHT}, "baseline")
       for name in ("resonance", "coherence", "holographic")},
}
BASELINE = "baseline (silu, normal init, cosine, no aux)"


class StepClock(TrainerCallback):
    def __init__(self):
        self.step_ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())


def train_one(name, seed, args, tokenizer, train, held_out) -> dict:
    config_overrides, training_overrides, auxiliary, _ = VARIANTS[name]
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    training = training_arguments(run_args, f"/tmp/crystalline_bench/{seed}", args.steps)
    training.eval_strategy = "no"  # one evaluation at the end
    for key, value in training_overrides.items():
        setattr(training, key, value)
    training.__post_init__()  # re-validate: lr_scheduler_type becomes a SchedulerType
    torch.manual_seed(seed)
    model = reso_model(config_overrides, tokenizer, args.preset)
    clock = StepClock()
    trainer = AtomicCheckpointTrainer(model=model, args=training, train_dataset=train, eval_dataset=held_out,
                                      data_collator=default_data_collator, callbacks=[clock],
                                      auxiliary_losses=AuxiliaryLossArguments(**auxiliary))
    started = time.perf_counter()
    trainer.train()
    final = trainer.evaluate()["eval_loss"]
    steps = [b - a for a, b in zip(clock.step_ends, clock.step_ends[1:])]
    aux_logged = {key: value for entry in trainer.state.log_history for key, value in entry.items()
                  if key.startswith("aux/")}
    print(f"  seed {seed}  {name:<44} held-out {final:.4f}  fastest step {min(steps) * 1000:.0f} ms  "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {"held_out_loss": final, "train_loss": trainer.state.log_history[-1].get("train_loss"),
            "step_time_s": min(steps), "median_step_time_s": statistics.median(steps), "last_aux_losses": aux_logged}


def measure_speed(args, tokenizer, train) -> dict:
    """Fastest optimizer step of each variant over `speed_repeats` short runs of `speed_steps` steps, the variants
    interleaved (round robin) so that a change of load on the machine hits all of them alike."""
    fastest = {name: float("inf") for name in VARIANTS}
    for _ in range(args.speed_repeats):
        for name in VARIANTS:
            config_overrides, training_overrides, auxiliary, _ = VARIANTS[name]
            training = training_arguments(args, "/tmp/crystalline_bench/speed", args.speed_steps)
            training.eval_strategy = "no"
            for key, value in training_overrides.items():
                setattr(training, key, value)
            training.__post_init__()
            torch.manual_seed(0)
            clock = StepClock()
            trainer = AtomicCheckpointTrainer(model=reso_model(config_overrides, tokenizer, args.preset), args=training,
                                              train_dataset=train, data_collator=default_data_collator,
                                              callbacks=[clock], auxiliary_losses=AuxiliaryLossArguments(**auxiliary))
            trainer.train()
            steps = [b - a for a, b in zip(clock.step_ends, clock.step_ends[1:])]
            fastest[name] = min(fastest[name], min(steps))
    print("  fastest step: " + ", ".join(f"{name.split(' ')[0]} {t * 1000:.0f} ms" for name, t in fastest.items()),
          flush=True)
    return fastest


def summarise(runs: dict, seeds: list[int], speed: dict | None = None) -> dict:
    rows = {}
    for name, (_, _, _, counterpart) in VARIANTS.items():
        if any(str(s) not in runs.get(name, {}) for s in seeds):
            continue  # not measured for every seed (a stopped run): left out of the table, listed in the JSON
        reference = BASELINE if counterpart else None
        losses = [runs[name][str(s)]["held_out_loss"] for s in seeds]
        times = [speed[name]] if speed else [runs[name][str(s)]["step_time_s"] for s in seeds]
        row = {"held_out_loss": losses, "mean_held_out_loss": statistics.mean(losses),
               "step_time_s": min(times)}
        if reference:
            deltas = [loss - runs[reference][str(s)]["held_out_loss"] for loss, s in zip(losses, seeds)]
            row.update(counterpart=reference, delta_vs_counterpart=deltas, mean_delta=statistics.mean(deltas),
                       step_time_ratio=row["step_time_s"] / (speed[reference] if speed else min(
                           runs[reference][str(s)]["step_time_s"] for s in seeds)),
                       wins=all(d < 0 for d in deltas))
        rows[name] = row
    return rows


def markdown_table(rows: dict, seeds: list[int]) -> str:
    lines = [f"| variant | held-out loss (seeds {', '.join(map(str, seeds))}) | mean Δ vs baseline | step time | "
             "wins |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        losses = " / ".join(f"{loss:.4f}" for loss in row["held_out_loss"])
        delta = f"{row['mean_delta']:+.4f}" if "mean_delta" in row else "—"
        ratio = f" ({row['step_time_ratio']:.2f}x)" if "step_time_ratio" in row else ""
        wins = ("yes" if row["wins"] else "no") if "wins" in row else "—"
        lines.append(f"| {name} | {losses} | {delta} | {row['step_time_s'] * 1000:.0f} ms{ratio} | {wins} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, row in rows.items() if "mean_delta" in row]
    figure, (losses, times) = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = ["tab:green" if rows[n]["wins"] else "tab:red" for n in names]
    losses.barh(names, [rows[n]["mean_delta"] for n in names], color=colours)
    for index, name in enumerate(names):
        losses.scatter(rows[name]["delta_vs_counterpart"], [index] * len(rows[name]["delta_vs_counterpart"]),
                       color="black", s=12, zorder=3)
    losses.axvline(0, color="black", linewidth=0.8)
    losses.set_xlabel("held-out loss − baseline (nats/token; dots: seeds, green: lower on every seed)")
    losses.set_title("quality vs the standard counterpart")
    times.barh(names, [rows[n]["step_time_ratio"] for n in names])
    times.axvline(1, color="black", linewidth=0.8)
    times.set_xlabel("step time / baseline step time")
    times.set_title("cost")
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", help="guanaco-format jsonl (not with --merge)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    # The defaults fit about 20 minutes (two processes) on 2 CPU cores shared with a load of ~30 (issue 17's run);
    # quality.py's budget is --preset small --steps 60 --block_size 128 --max_eval_blocks 24 where there is compute.
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_eval_blocks", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--speed", action="store_true",
                        help="only measure step times (interleaved short runs) into crystalline_<tag>.json, for --merge")
    parser.add_argument("--speed_steps", type=int, default=6)
    parser.add_argument("--speed_repeats", type=int, default=2)
    parser.add_argument("--tag", default=None,
                        help="write crystalline_<tag>.json only (e.g. one seed per process), for --merge")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine the runs of tagged result files into crystalline.json/.png (no training)")
    args = parser.parse_args()
    if args.merge:
        return merge(args.merge)
    if args.data is None:
        parser.error("the data file is required (except with --merge)")
    if args.quick:
        args.steps, args.block_size, args.batch_size, args.max_eval_blocks, args.seeds = 3, 32, 2, 4, [0]
    args.eval_points = 1  # read by quality.training_arguments; evaluation runs once, at the end
    args.seed = 0  # the split and tokenizer of quality.py's seed 0 for every run

    train_texts, held_out_texts = split_rows(args.data, 0)
    tokenizer = reso_hf.train_tokenizer(train_texts, args.vocab_size)
    train = blocks(train_texts, tokenizer, args.block_size)
    held_out = blocks(held_out_texts, tokenizer, args.block_size)
    held_out = held_out.select(range(min(len(held_out), args.max_eval_blocks)))
    print(f"{len(train)} train blocks, {len(held_out)} held-out blocks of {args.block_size}; {args.steps} steps x "
          f"{args.batch_size}; seeds {args.seeds}; {torch.get_num_threads()} threads", flush=True)

    if args.speed:
        tag = args.tag or "speed"
        write_json(RESULTS / f"crystalline_{tag}.json", {"commands": [" ".join(sys.argv)], "settings": vars(args),
                                                          "speed": measure_speed(args, tokenizer, train)})
        print(f"wrote {RESULTS / f'crystalline_{tag}.json'}")
        return
    runs = {name: {} for name in VARIANTS}
    result = {"commands": [" ".join(sys.argv)], "settings": vars(args), "auxiliary_weight": AUX_WEIGHT, "runs": runs,
              "versions": {"torch": torch.__version__, "reso_hf": reso_hf.__version__},
              "threads": torch.get_num_threads()}
    for seed in args.seeds:  # seeds outermost: a load change on the shared machine hits every variant alike
        for name in VARIANTS:
            runs[name][str(seed)] = train_one(name, seed, args, tokenizer, train, held_out)
            if args.tag:  # after every run: a stopped process keeps what it measured
                write_json(RESULTS / f"crystalline_{args.tag}.json", result)
    if args.tag:
        print(f"wrote {RESULTS / f'crystalline_{args.tag}.json'}")
        return
    finish(result, args.seeds, RESULTS / ("crystalline_quick" if args.quick else "crystalline"))


def write_json(path: Path, content: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def finish(result: dict, seeds: list[int], stem: Path) -> None:
    rows = summarise(result["runs"], seeds, result.get("speed"))
    table = markdown_table(rows, seeds)
    missing = [name for name in VARIANTS if name not in rows]
    write_json(with_ending(stem, ".json"), {**result, "summary": rows, "table": table, "not_measured": missing})
    if missing:
        print(f"not measured for every seed: {missing}")
    plot(rows, with_ending(stem, ".png"))
    print(table)
    print(f"wrote {with_ending(stem, '.json')} and .png")


def merge(paths: list[str]) -> None:
    """One result from tagged files of the same settings (seeds run by separate processes)."""
    parts = [json.loads(Path(path).read_text()) for path in paths]
    speed = [part["speed"] for part in parts if "speed" in part]
    parts = [part for part in parts if "speed" not in part]
    settings = [{k: v for k, v in part["settings"].items() if k not in ("seeds", "tag")} for part in parts]
    if any(s != settings[0] for s in settings):
        raise ValueError(f"cannot merge runs of different settings: {settings}")
    runs = {name: {} for name in VARIANTS}
    for part in parts:
        for name, by_seed in part["runs"].items():
            runs[name].update(by_seed)
    seeds = sorted({int(seed) for part in parts for seed in part["runs"][BASELINE]})
    result = {**parts[0], "commands": [c for part in parts for c in part["commands"]] + [" ".join(sys.argv)],
              "settings": {**parts[0]["settings"], "seeds": seeds, "tag": None}, "runs": runs}
    if speed:  # the dedicated interleaved measurements (fastest of all) replace the training runs' step times
        result["speed"] = {name: min(part[name] for part in speed) for name in VARIANTS}
    finish(result, seeds, RESULTS / "crystalline")


if __name__ == "__main__":
    main()
