"""Conversation memory layers on a real model (issue 14): does a layer trained on a conversation that states facts
make held-out questions about those facts cheaper, without moving unrelated text?

Model: SmolLM2-135M-Instruct (the GGUF, dequantised to float32). Facts are synthetic (invented names of people,
towns and pets, 4-digit numbers; the base model cannot know them), drawn from a seed. A session is a conversation of
one turn per fact: the user states the fact, the assistant restates it ("Understood: ..."). After the session, the
held-out questions ask about every fact in other words, with an answer in other words too (templates disjoint from
the statements'). For each session (fresh layer, `reso_hf.conversation_memory.ConversationMemory`):

  answer loss      mean loss per token of the questions' answers (assistant tokens): base model, with the layer, and
                   as a reference with the whole session in the prompt (in context: what the layer tries to replace)
  gain             1 - L_memory / L_base   (> 0: the layer helps)
  probe move       |L_memory - L_base| / L_base on 30 unrelated guanaco rows (answers)    goal <= 0.02
  value gain       the same on the tokens of the fact's value only (the town, the number, ...)
  on other facts   the gains of the same layer on the questions of another session (other facts, same wording):
                   what the layer gains there is the style of the answers, not memory of the facts
Tuning: steps_per_turn x lr on the dev seeds (the facts of other seeds); the setting with the largest dev
fact-specific value gain (value gain - value gain on other facts) whose probe moves <= 2% is reported on the
held-out seeds. Retrieval: all held-out sessions are saved into one folder and
each question is routed to the layer with the closest centroid (`retrieve`): top-1 accuracy and the answer loss with
the retrieved layer.

    python benchmarks/memory_layers.py          # about 10 minutes on 2 CPU cores
    python benchmarks/memory_layers.py --quick                                   # smoke run, < 1 minute

Writes benchmarks/results/memory_layers.json and memory_layers.png (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from continual import atomic_write  # noqa: E402
from dynamic_lora_common import DEFAULT_MODEL, RESULTS, load_causal_lm, load_tokenizer, markdown_table  # noqa: E402

from reso_hf.conversation_memory import ConversationMemory  # noqa: E402
from reso_hf.training.data import IGNORE_INDEX, parse_guanaco, read_jsonl_texts, tokenize_messages  # noqa: E402

GUANACO = Path("/work/shared/data/guanaco/openassistant_best_replies_eval.jsonl")
PROBE_GOAL = 0.02

SYLLABLES = ["zor", "vath", "quel", "brin", "dle", "mox", "tev", "ulo", "kes", "pra", "ilv", "eth", "dra", "mun",
             "yos", "pel", "gar", "wim", "osk", "lir", "fen", "tab", "rood", "cai", "sel", "vun", "hob", "nir"]
TOWN_ENDINGS = ["moor", "haven", "stead", "wick", "ford", "holm", "mere", "combe"]
JOBS = ["glassblower", "beekeeper", "cartographer", "violin maker", "lighthouse keeper", "clockmaker", "tile setter",
        "ferry pilot", "cheese maker", "bookbinder", "falconer", "hatmaker"]
ANIMALS = ["tortoise", "parrot", "ferret", "goat", "hedgehog", "donkey", "owl", "lizard"]

# Per attribute: statement turns (user, assistant) and held-out question turns (user, answer), worded differently.
TEMPLATES = {
    "town": {
        "state": [("Please remember this: my friend {p} lives in {v}.", "Understood: {p} lives in {v}."),
                  ("A fact for you: {p} has a house in {v}.", "Noted, {p} has a house in {v}.")],
        "ask": [("Which town is {p}'s home?", "{p}'s home is the town of {v}."),
                ("Where could I visit {p}?", "You could visit {p} in {v}.")],
    },
    "job": {
        "state": [("Remember that {p} works as a {v}.", "Got it: {p} works as a {v}."),
                  ("By the way, {p} earns a living as a {v}.", "Noted, {p} earns a living as a {v}.")],
        "ask": [("What does {p} do for work?", "{p} is a {v} by trade."),
                ("What is {p}'s profession?", "{p}'s profession is {v}.")],
    },
    "number": {
        "state": [("Keep in mind that {p}'s locker code is {v}.", "Understood: {p}'s locker code is {v}."),
                  ("Note this: the code of {p}'s locker is {v}.", "Noted, the code of {p}'s locker is {v}.")],
        "ask": [("Which code opens {p}'s locker?", "{p}'s locker opens with {v}."),
                ("What number do I type for {p}'s locker?", "For {p}'s locker you type {v}.")],
    },
    "pet": {
        "state": [("Remember that {p} owns a {a} named {v}.", "Got it: {p} owns a {a} named {v}."),
                  ("Also, {p} has a pet {a} called {v}.", "Noted, {p} has a pet {a} called {v}.")],
        "ask": [("What is the name of {p}'s {a}?", "{p}'s {a} is named {v}."),
                ("How is {p}'s pet {a} called?", "The {a} of {p} is called {v}.")],
    },
}


def invented_word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts))


def make_session(seed: int, people: int, attributes: list[str]) -> dict:
    """One session: statement turns (one per fact) and held-out question turns about the same facts."""
    rng = random.Random(seed)
    turns, questions = [], []
    for _ in range(people):
        person = f"{invented_word(rng, 2).capitalize()} {invented_word(rng, 2).capitalize()}"
        for attribute in attributes:
            animal = rng.choice(ANIMALS)
            value = {"town": lambda: invented_word(rng, 2).capitalize() + rng.choice(TOWN_ENDINGS),
                     "job": lambda: rng.choice(JOBS),
                     "number": lambda: str(rng.randint(1000, 9999)),
                     "pet": lambda: invented_word(rng, 2).capitalize()}[attribute]()
            fill = dict(p=person, v=value, a=animal)
            user, assistant = rng.choice(TEMPLATES[attribute]["state"])
            turns.append((user.format(**fill), assistant.format(**fill)))
            for user, answer in TEMPLATES[attribute]["ask"]:
                questions.append((user.format(**fill), answer.format(**fill), value))
    rng.shuffle(turns)
    return {"seed": seed, "turns": turns, "questions": questions}


def probe_rows(tokenizer, rows: int, max_tokens: int, path: Path = GUANACO) -> list[tuple[list, list]]:
    """The first `rows` guanaco eval rows (answers labelled), cut to max_tokens: text unrelated to the facts."""
    template = tokenizer.chat_template
    result = []
    for text in read_jsonl_texts(str(path)):
        ids, labels = tokenize_messages(tokenizer, parse_guanaco(text), template, assistant_only=True)
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        if sum(label != IGNORE_INDEX for label in labels) >= 8:
            result.append((ids, labels))
        if len(result) == rows:
            break
    return result


def in_context_rows(tokenizer, session: dict) -> list[tuple[list, list]]:
    """Each question after the whole session, labels only on its answer (the in-context reference)."""
    history = []
    for user, assistant in session["turns"]:
        history += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    rows = []
    for user, answer, _ in session["questions"]:
        messages = history + [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        ids, labels = tokenize_messages(tokenizer, messages, tokenizer.chat_template, assistant_only=True)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        cut = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append((ids, [IGNORE_INDEX] * cut + labels[cut:]))
    return rows


@torch.no_grad()
def mean_loss(memory: ConversationMemory, rows, batch: int = 8) -> float:
    """Mean loss per labelled token over rows (weighting every token equally)."""
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        losses = memory.turn_losses(chunk)
        tokens = torch.tensor([max(1, sum(l != IGNORE_INDEX for l in labels[1:])) for _, labels in chunk])
        total += float((losses.cpu() * tokens).sum())
        count += int(tokens.sum())
    return total / count


def value_rows(memory: ConversationMemory, questions) -> list[tuple[list, list]]:
    """The question turns with labels only on the tokens of the fact's value inside the answer."""
    rows = []
    for user, answer, value in questions:
        ids, labels = memory.encode_turn(user, answer)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        text = memory.tokenizer.apply_chat_template(messages, chat_template=memory.template, tokenize=False)
        start = text.rindex(value)
        offsets = memory.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        inside = [a < start + len(value) and b > start for a, b in offsets] + [False] * (len(ids) - len(offsets))
        rows.append((ids, [label if keep else IGNORE_INDEX for label, keep in zip(labels, inside)]))
    return rows


@torch.no_grad()
def losses(memory: ConversationMemory, session: dict, batch: int = 8) -> dict:
    """{"answer", "value"}: mean loss per token of the answers and of the values in them (one forward for both)."""
    answers = [memory.encode_turn(u, a) for u, a, _ in session["questions"]]
    values = value_rows(memory, session["questions"])
    totals = {"answer": [0.0, 0], "value": [0.0, 0]}
    for start in range(0, len(answers), batch):
        input_ids, answer_labels, mask = memory._batch(answers[start:start + batch])
        _, value_labels, _ = memory._batch(values[start:start + batch])
        logits = memory.model(input_ids=input_ids, attention_mask=mask).logits.float()[:, :-1].transpose(1, 2)
        for key, labels in (("answer", answer_labels), ("value", value_labels)):
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            totals[key][0] += float(loss)
            totals[key][1] += int((targets != IGNORE_INDEX).sum())
    return {key: total / count for key, (total, count) in totals.items()}


_BASE_LOSSES: dict = {}


def base_losses(memory: ConversationMemory, session: dict) -> dict:
    """Losses of the model without memory (cached per session: the same for every setting)."""
    if session["seed"] not in _BASE_LOSSES:
        with memory.disabled():
            _BASE_LOSSES[session["seed"]] = losses(memory, session)
    return _BASE_LOSSES[session["seed"]]


def run_session(memory: ConversationMemory, session: dict, control: dict, probe, base_probe: float, name: str) -> dict:
    """Train a fresh layer on `session`; evaluate its questions, the questions of `control` (other facts: what the
    layer gains there is style, not memory) and the probe."""
    memory.new_session(name)
    base, control_base = base_losses(memory, session), base_losses(memory, control)
    start = time.perf_counter()
    for user, assistant in session["turns"]:
        memory.observe_turn(user, assistant)
    train_s = time.perf_counter() - start
    with_memory, control_memory = losses(memory, session), losses(memory, control)
    probe_loss = mean_loss(memory, probe)
    return {"seed": session["seed"], "turns": len(session["turns"]), "questions": len(session["questions"]),
            "answer_loss_base": base["answer"], "answer_loss_memory": with_memory["answer"],
            "gain": 1 - with_memory["answer"] / base["answer"],
            "value_loss_base": base["value"], "value_loss_memory": with_memory["value"],
            "value_gain": 1 - with_memory["value"] / base["value"],
            "control_gain": 1 - control_memory["answer"] / control_base["answer"],
            "control_value_gain": 1 - control_memory["value"] / control_base["value"],
            "probe_loss_base": base_probe, "probe_loss_memory": probe_loss,
            "probe_move": abs(probe_loss - base_probe) / base_probe, "train_s": train_s,
            "importance": memory.importance}


def summarize(results: list[dict]) -> dict:
    def mean(key):
        return statistics.mean(r[key] for r in results)

    return {"gain_mean": mean("gain"), "value_gain_mean": mean("value_gain"), "control_gain_mean": mean("control_gain"),
            "control_value_gain_mean": mean("control_value_gain"),
            "value_loss_base": mean("value_loss_base"), "value_loss_memory": mean("value_loss_memory"),
            "gain_min": min(r["gain"] for r in results),
            "probe_move_mean": statistics.mean(r["probe_move"] for r in results),
            "probe_move_max": max(r["probe_move"] for r in results),
            "answer_loss_base": statistics.mean(r["answer_loss_base"] for r in results),
            "answer_loss_memory": statistics.mean(r["answer_loss_memory"] for r in results),
            "train_s_per_turn": statistics.mean(r["train_s"] / r["turns"] for r in results)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a .gguf file, a folder or a Hub id")
    parser.add_argument("--dev-seeds", type=int, nargs="+", default=[100], help="seeds of the dev sessions")
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[1, 2, 3], help="held-out sessions")
    parser.add_argument("--people", type=int, default=1, help="people per session (one turn per fact)")
    parser.add_argument("--attributes", nargs="+", default=list(TEMPLATES), choices=list(TEMPLATES))
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 12], help="steps_per_turn values tried on dev")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="lr values tried on dev")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8, help="the memory adapts the last K decoder layers")
    parser.add_argument("--target-modules", nargs="+", default=None, help="default: all linear modules")
    parser.add_argument("--decay", type=float, default=0.8)
    parser.add_argument("--adapter-type", default="lora", choices=["lora", "dynamic_lora"])
    parser.add_argument("--probe-data", type=Path, default=GUANACO, help="guanaco-format jsonl of the probe rows")
    parser.add_argument("--probe-rows", type=int, default=30)
    parser.add_argument("--probe-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 dev and 1 test session, 1 setting, 6 probe rows")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_layers")
    return parser.parse_args(argv)


def plot(report: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    tests = report["test"]["sessions"]
    x = range(len(tests))
    width = 0.27
    left.bar([i - width for i in x], [r["answer_loss_base"] for r in tests], width, label="base")
    left.bar(list(x), [r["answer_loss_memory"] for r in tests], width, label="memory layer")
    left.bar([i + width for i in x], report["test"]["in_context"], width, label="session in context")
    left.set_xticks(list(x), [f"seed {r['seed']}" for r in tests])
    left.set_ylabel("answer loss (nats/token)")
    left.set_title("held-out questions about the session's facts")
    left.legend(loc="lower right")
    for setting in report["dev"]["grid"]:
        right.scatter(setting["probe_move_max"] * 100, setting["gain_mean"] * 100, color="tab:blue")
        right.annotate(f"{setting['steps_per_turn']} st, lr {setting['lr']:g}",
                       (setting["probe_move_max"] * 100, setting["gain_mean"] * 100), fontsize=8)
    right.axvline(PROBE_GOAL * 100, color="red", linestyle="--", label="probe goal 2%")
    right.set_xlabel("max probe move (%)")
    right.set_ylabel("mean answer-loss gain (%)")
    right.set_title("dev: steps per turn x learning rate")
    right.legend()
    fig.suptitle(f"Conversation memory layers on {report['model']}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.dev_seeds, args.test_seeds, args.steps, args.lrs = args.dev_seeds[:1], args.test_seeds[:1], [2], [3e-3]
        args.attributes, args.probe_rows, args.probe_tokens = args.attributes[:2], 4, 64
    torch.set_num_threads(args.threads)
    _BASE_LOSSES.clear()  # a previous main() in this process had another model
    started = time.perf_counter()
    model, description = load_causal_lm(args.model)
    tokenizer = load_tokenizer(args.model)
    workdir = tempfile.mkdtemp(prefix="memory_layers_")
    memory = ConversationMemory(model, tokenizer, workdir, rank=args.rank, decay=args.decay, layers=args.layers,
                                target_modules=args.target_modules,
                                adapter_type=args.adapter_type, max_layers=len(args.test_seeds), chat_template="model")
    probe = probe_rows(tokenizer, args.probe_rows, args.probe_tokens, args.probe_data)
    with memory.disabled():
        base_probe = mean_loss(memory, probe)
    print(f"loaded {description} in {time.perf_counter() - started:.0f} s; probe base loss {base_probe:.4f}",
          flush=True)

    grid = []
    dev_sessions = [make_session(seed, args.people, args.attributes) for seed in args.dev_seeds]
    # the control of a session: another session's facts (seed + 1000, never a dev or test session)
    dev_controls = [make_session(seed + 1000, args.people, args.attributes) for seed in args.dev_seeds]
    for steps in args.steps:
        for lr in args.lrs:
            memory.steps_per_turn, memory.lr = steps, lr
            results = [run_session(memory, s, dev_controls[i], probe, base_probe, f"dev-{s['seed']}")
                       for i, s in enumerate(dev_sessions)]
            grid.append({"steps_per_turn": steps, "lr": lr, **summarize(results), "sessions": results})
            print(f"dev steps {steps} lr {lr:g}: gain {grid[-1]['gain_mean']:.3f}, probe move max "
                  f"{grid[-1]['probe_move_max']:.4f}", flush=True)
    allowed = [g for g in grid if g["probe_move_max"] <= PROBE_GOAL] or grid
    chosen = max(allowed, key=lambda g: g["value_gain_mean"] - g["control_value_gain_mean"])
    memory.steps_per_turn, memory.lr = chosen["steps_per_turn"], chosen["lr"]

    test_sessions = [make_session(seed, args.people, args.attributes) for seed in args.test_seeds]
    test_controls = [make_session(seed + 1000, args.people, args.attributes) for seed in args.test_seeds]
    results, in_context = [], []
    for session, control in zip(test_sessions, test_controls):
        results.append(run_session(memory, session, control, probe, base_probe, f"test-{session['seed']}"))
        memory.save()
        with memory.disabled():
            in_context.append(mean_loss(memory, in_context_rows(tokenizer, session), batch=4))
        print(f"test seed {session['seed']}: answer loss {results[-1]['answer_loss_base']:.3f} -> "
              f"{results[-1]['answer_loss_memory']:.3f} (in context {in_context[-1]:.3f}), probe move "
              f"{results[-1]['probe_move']:.4f}", flush=True)

    # Retrieval over the saved held-out layers: each question goes to the layer with the closest centroid.
    hits, routed = 0, []
    for session in test_sessions:
        for user, answer, _ in session["questions"]:
            best = memory.retrieve(user, top_k=1)[0][0]
            hits += best == f"test-{session['seed']}"
            memory.load(best, count_use=False)
            routed.append(mean_loss(memory, [memory.encode_turn(user, answer)]))
    questions = sum(len(s["questions"]) for s in test_sessions)
    test = {**summarize(results), "sessions": results, "in_context": in_context,
            "in_context_mean": statistics.mean(in_context),
            "retrieval_top1": hits / questions, "answer_loss_retrieved_mean": statistics.mean(routed)}
    report = {
        "model": description, "adapter_type": args.adapter_type, "rank": args.rank, "decay": args.decay,
        "layers": args.layers, "target_modules": args.target_modules or "all-linear",
        "people": args.people, "attributes": args.attributes, "probe_rows": len(probe),
        "dev": {"seeds": args.dev_seeds, "grid": grid,
                "chosen": {"steps_per_turn": chosen["steps_per_turn"], "lr": chosen["lr"]}},
        "test": test,
        "goals": {"answers_lose_less": test["gain_min"] > 0, "probe_move_max": test["probe_move_max"],
                  "probe_move_within_2pct": test["probe_move_max"] <= PROBE_GOAL},
        "quick": args.quick, "wall_s": time.perf_counter() - started,
    }
    out = args.out
    atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2),
                                                                            encoding="utf-8"))
    plot(report, out.with_suffix(".png"))
    def pct(value):
        return f"{100 * value:.1f}%"

    rows = [[f"seed {r['seed']}", r["answer_loss_base"], r["answer_loss_memory"], c, pct(r["gain"]),
             pct(r["control_gain"]), r["value_loss_base"], r["value_loss_memory"], pct(r["value_gain"]),
             pct(r["control_value_gain"]), f"{100 * r['probe_move']:.2f}%"] for r, c in zip(results, in_context)]
    rows.append(["mean", test["answer_loss_base"], test["answer_loss_memory"], test["in_context_mean"],
                 pct(test["gain_mean"]), pct(test["control_gain_mean"]), test["value_loss_base"],
                 test["value_loss_memory"], pct(test["value_gain_mean"]), pct(test["control_value_gain_mean"]),
                 f"{100 * test['probe_move_mean']:.2f}%"])
    print(markdown_table(["held-out session", "answer loss base", "memory layer", "in context", "gain",
                          "gain on other facts", "value loss base", "memory layer", "value gain",
                          "value gain on other facts", "probe move"], rows))
    print(f"chosen on dev: steps_per_turn {chosen['steps_per_turn']}, lr {chosen['lr']:g}; retrieval top-1 "
          f"{test['retrieval_top1']:.2f} over {questions} questions, answer loss with the retrieved layer "
          f"{test['answer_loss_retrieved_mean']:.3f}; {test['train_s_per_turn']:.2f} s of training per turn; wall "
          f"{report['wall_s']:.0f} s; wrote {out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    main()
