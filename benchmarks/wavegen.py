"""WaveGen generation cache (issue 14, dynamic-lora-roadmap Phase 5): hit rate, speed-up, correctness, invalidation.

Workload (repetitive with variation): Q questions (human turns of the guanaco eval split, ASCII, 20-160 characters)
each written with one of 4 paraphrase templates ("{q}", "Please answer: {q}", "Question: {q}", "{q} Thanks!"); a
stream of R requests draws the question and the template from Zipf laws (exponent 1.1 and 1.5, fixed seed). Only
exact repeats of a (question, template) pair can hit; paraphrases are new keys. Greedy decoding, max_new_tokens N.

Model: a DynamicLoRA adapter (all five tiers, q/v projections, a few AdamW steps on the bundled sample so that every
tier is non-zero) on the tiny ResoLLM that benchmarks/_generation_common.py trains (default), or on SmolLM2-135M-
Instruct (`--model smollm2`, chat template). Three runs over the same stream:
  static               the adapter does not change;
  dynamic              every U requests one AdamW step on the context tier (an online session update), context acts;
  dynamic_context_off  the same updates, but served with the context tier switched off (AdapterComposite.use_tiers):
                       entries then do not depend on the context tier (the invalidation rule of reso_hf/wavegen).
Correctness: after EVERY hit the same request is generated afresh (model.generate, same settings, same model state)
and compared token for token; the fresh time is what the request costs without the cache, so
  speed-up = (sum of miss times + sum of fresh times of the hits) / (sum of miss times + sum of hit times).
Invalidation: on each run's cache, one more context-tier step, then one slow-tier step (domain tier trained on the
migration examples the run exported: entries with >= T hits, handed to `on_migrate`), each followed by
`cache.validate(model)`: entries invalidated per change. Also reported: NLL of the migration examples' completions
before and after that slow-tier step.

    python benchmarks/wavegen.py                         # tiny model, about 3 minutes on 2 cores
    python benchmarks/wavegen.py --model smollm2 --requests 150 --questions 30 --new-tokens 24   # SmolLM2, 11 min
    python benchmarks/wavegen.py --quick                      # untrained micro model, seconds (tests)

Writes benchmarks/results/wavegen[_smollm2|_quick].json and .png (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _generation_common import RESULTS, brief_model, sample_texts, save_figure, write_json  # noqa: E402
from dynamic_lora_common import markdown_table  # noqa: E402

import reso_hf  # noqa: E402
from reso_hf.adapter_composition import AdapterComposite  # noqa: E402
from reso_hf.wavegen import WaveGenCache, tier_component  # noqa: E402

GUANACO_EVAL = Path("/work/shared/data/guanaco/openassistant_best_replies_eval.jsonl")
TEMPLATES = ("{q}", "Please answer: {q}", "Question: {q}", "{q} Thanks!")
TIERS = ("foundation", "domain", "swarm", "agent", "context")
RUNS = ("static", "dynamic", "dynamic_context_off")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny: the briefly trained tiny ResoLLM of _generation_common; smollm2: SmolLM2-135M")
    parser.add_argument("--requests", type=int, default=400, help="requests in the stream (R)")
    parser.add_argument("--questions", type=int, default=40, help="distinct questions (Q)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens (N), greedy decoding")
    parser.add_argument("--update-every", type=int, default=50, help="context-tier step every U requests")
    parser.add_argument("--migration-threshold", type=int, default=8, help="hits that make an entry migrate (T)")
    parser.add_argument("--max-entries", type=int, default=256, help="cache capacity")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the adapter steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="untrained micro model, 40 requests, 8 tokens")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/wavegen...)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.questions, args.new_tokens, args.update_every = 40, 6, 8, 10
        args.migration_threshold = 4
    if args.out is None:
        args.out = RESULTS / ("wavegen_quick" if args.quick else "wavegen" if args.model == "tiny" else "wavegen_smollm2")
    return args


# ----- workload ---------------------------------------------------------------------------------------------------
def questions(limit: int, quick: bool = False) -> list[str]:
    if GUANACO_EVAL.is_file() and not quick:
        with open(GUANACO_EVAL, encoding="utf-8") as handle:
            rows = [json.loads(line)["text"] for line in handle if line.strip()]
    else:  # --quick (tests) uses the bundled sample, never the eval split
        rows = sample_texts()
    found = []
    for text in rows:
        question = " ".join(text.split("### Assistant:")[0].replace("### Human:", "").split())
        if question.isascii() and 20 <= len(question) <= 160 and question not in found:
            found.append(question)
    if len(found) < limit:
        raise ValueError(f"--questions {limit}: only {len(found)} usable questions in the data")
    return found[:limit]


def zipf_index(rng: random.Random, size: int, exponent: float) -> int:
    weights = [1.0 / (rank + 1) ** exponent for rank in range(size)]
    return rng.choices(range(size), weights=weights)[0]


def request_stream(args) -> list[tuple[int, int]]:
    rng = random.Random(args.seed)
    return [(zipf_index(rng, args.questions, 1.1), zipf_index(rng, len(TEMPLATES), 1.5))
            for _ in range(args.requests)]


# ----- model --------------------------------------------------------------------------------------------------------
def load_model(args):
    """(model with a DynamicLoRA adapter whose tiers are all non-zero, tokenizer, prompt formatter, description)."""
    if args.quick:
        torch.manual_seed(args.seed)
        tokenizer = reso_hf.create_default_tokenizer()
        config = reso_hf.tiny_config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=512)
        base, description = reso_hf.ResoLLMForCausalLM(config).eval(), "untrained micro ResoLLM (quick)"
    elif args.model == "tiny":
        base, tokenizer, info = brief_model()
        description = f"tiny ResoLLM trained {info['steps']} steps on the bundled sample"
    else:
        from dynamic_lora_common import load_causal_lm, load_tokenizer

        base, description = load_causal_lm("smollm2-gguf")
        tokenizer = load_tokenizer("smollm2-gguf")

    if args.model == "smollm2" and not args.quick:
        def format_prompt(text: str) -> str:
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
    else:
        def format_prompt(text: str) -> str:
            return f"### Human: {text}### Assistant:"

    config = reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    torch.manual_seed(args.seed)
    model = get_peft_model(base, config)
    warm_up_adapter(model, tokenizer, args)
    model.eval()
    return model, tokenizer, format_prompt, description


def training_rows(tokenizer, start: int, count: int, length: int = 64) -> torch.Tensor:
    texts = sample_texts()
    rows = [tokenizer(texts[(start + i) % len(texts)])["input_ids"][:length] for i in range(count)]
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width] for r in rows])


def train_tiers(model, tiers, batches: list[torch.Tensor], lr: float) -> None:
    """AdamW steps on the factors of `tiers` only (one step per batch); labels = inputs (language modelling)."""
    names = tuple(f".{t}" for t in tiers)
    params = [p for n, p in model.named_parameters() if "dynamic_lora_" in n and n.endswith(names)]
    chosen = {id(p) for p in params}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def warm_up_adapter(model, tokenizer, args) -> None:
    # DynamicLoRA starts with B = 0 on every tier: a few steps on all tiers make each one act (and hash as acting)
    train_tiers(model, TIERS, [training_rows(tokenizer, 2 * i, 2) for i in range(4)], args.lr)


def completion_nll(model, examples: list[dict]) -> float:
    """Mean NLL per completion token of the migration examples (prompt tokens unlabelled)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example["prompt_ids"] + example["completion_ids"]])
            labels = ids.clone()
            labels[0, :len(example["prompt_ids"])] = -100
            n = len(example["completion_ids"])
            if n == 0:
                continue
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count if count else float("nan")


# ----- one run --------------------------------------------------------------------------------------------------
def run_stream(name: str, model, composite, tokenizer, prompts, stream, args, adapter_state) -> dict:
    restore_adapter(model, adapter_state)
    composite.use_tiers("default", TIERS if name != "dynamic_context_off" else TIERS[:-1])
    migrated: list[dict] = []
    cache = WaveGenCache(max_entries=args.max_entries, migration_threshold=args.migration_threshold,
                         on_migrate=migrated.extend, tokenizer=tokenizer)
    settings = dict(max_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    hit_seconds, miss_seconds, fresh_seconds, mismatches, verified = 0.0, 0.0, 0.0, 0, 0
    cumulative_hits, updates = [], []
    for index, (question, template) in enumerate(stream):
        if name != "static" and index > 0 and index % args.update_every == 0:
            # the session update trains the context tier whether or not it is served (it keeps learning)
            train_tiers(model, ["context"], [training_rows(tokenizer, 7 * index, 2)], args.lr)
            updates.append(index)
        encoded = tokenizer(prompts[question][template], return_tensors="pt")
        start = time.perf_counter()
        output = cache.generate(model, encoded["input_ids"], attention_mask=encoded["attention_mask"], **settings)
        elapsed = time.perf_counter() - start
        if cache.last_event["result"] == "hit":
            hit_seconds += elapsed
            start = time.perf_counter()
            with torch.no_grad():
                fresh = model.generate(encoded["input_ids"], attention_mask=encoded["attention_mask"], **settings)
            fresh_seconds += time.perf_counter() - start
            verified += 1
            mismatches += int(not torch.equal(fresh, output))
        else:
            miss_seconds += elapsed
        cumulative_hits.append(cache.stats()["hits"])
    stats = cache.stats()
    speedup = (miss_seconds + fresh_seconds) / (miss_seconds + hit_seconds)
    result = {"stats": stats, "hits_verified": verified, "mismatches": mismatches, "speedup": speedup,
              "hit_ms": 1000 * hit_seconds / max(1, stats["hits"]),
              "fresh_ms_of_hits": 1000 * fresh_seconds / max(1, verified),
              "miss_ms": 1000 * miss_seconds / max(1, stats["misses"]), "updates_at": updates,
              "cumulative_hits": cumulative_hits, "migrated_examples": len(migrated),
              "distinct_requests": len(set(stream))}
    result.update(invalidation_probe(model, composite, cache, tokenizer, migrated, args, name))
    return result


def invalidation_probe(model, composite, cache, tokenizer, migrated, args, name) -> dict:
    """From the same model and cache state, separately: one context-tier step, and one slow-tier (domain) step on
    the migration examples; each followed by `validate` on its own copy of the cache: entries invalidated."""
    state, before = adapter_snapshot(model), len(cache)
    context_cache = copy.deepcopy(cache)
    train_tiers(model, ["context"], [training_rows(tokenizer, 999, 2)], args.lr)
    context_swept = context_cache.validate(model)
    restore_adapter(model, state)
    examples = migrated or [cache.migration_example(e) for e in list(cache.entries.values())[:4]]
    nll_before = completion_nll(model, examples)
    batches = [torch.tensor([e["prompt_ids"] + e["completion_ids"]]) for e in examples[:8]]
    train_tiers(model, ["domain"], batches, args.lr)
    nll_after = completion_nll(model, examples)
    slow_swept = cache.validate(model)
    return {"entries_before_changes": before, "context_change_invalidated": before - len(context_cache),
            "context_change_components": context_swept, "slow_change_invalidated": before - len(cache),
            "slow_change_components": slow_swept, "slow_step_examples": len(batches),
            "migration_nll_before": nll_before, "migration_nll_after": nll_after,
            "migration_examples_from": "on_migrate" if migrated else "cache entries (none reached the threshold)"}


def adapter_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.base_model.tier_tensors().items()}


@torch.no_grad()
def restore_adapter(model, state: dict[str, torch.Tensor]) -> None:
    live = model.base_model.tier_tensors()
    for key, tensor in state.items():
        live[key].copy_(tensor)


# ----- report ---------------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"static": dict(lw=3, alpha=0.5), "dynamic": dict(lw=1.5), "dynamic_context_off": dict(lw=1.5, ls="--")}
    for name in RUNS:
        run = report["runs"][name]
        hits = run["cumulative_hits"]
        left.plot(range(1, len(hits) + 1), [h / (i + 1) for i, h in enumerate(hits)], label=name, **styles[name])
    for update in report["runs"]["dynamic"]["updates_at"]:
        left.axvline(update, color="grey", lw=0.5, ls=":")
    left.set_xlabel("request")
    left.set_ylabel("cumulative hit rate")
    left.set_title("hit rate (dotted: context-tier updates)")
    left.legend()
    width = 0.38
    positions = range(len(RUNS))
    right.bar([p - width / 2 for p in positions], [report["runs"][n]["context_change_invalidated"] for n in RUNS],
              width, label="context (fast) tier step")
    right.bar([p + width / 2 for p in positions], [report["runs"][n]["slow_change_invalidated"] for n in RUNS],
              width, label="domain (slow) tier step")
    right.set_xticks(list(positions), RUNS)
    right.set_ylabel("entries invalidated")
    right.set_title("invalidation by the tier that changed")
    right.legend()
    figure.suptitle(f"WaveGen on {report['model']}: {report['requests']} requests, "
                    f"{report['distinct_requests']} distinct")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer, format_prompt, description = load_model(args)
    prompts = [[format_prompt(t.format(q=q)) for t in TEMPLATES] for q in questions(args.questions, args.quick)]
    stream = request_stream(args)
    composite = AdapterComposite(model, {"default": 1.0})
    state = adapter_snapshot(model)
    started = time.perf_counter()
    runs = {}
    for name in RUNS:
        print(f"run {name} ...", flush=True)
        runs[name] = run_stream(name, model, composite, tokenizer, prompts, stream, args, state)
    report = {
        "model": description, "requests": args.requests, "questions": args.questions, "templates": len(TEMPLATES),
        "distinct_requests": len(set(stream)), "new_tokens": args.new_tokens, "update_every": args.update_every,
        "migration_threshold": args.migration_threshold, "max_entries": args.max_entries, "seed": args.seed,
        "quick": args.quick, "seconds": time.perf_counter() - started, "runs": runs,
        "all_hits_correct": all(r["mismatches"] == 0 for r in runs.values()),
        "hits_verified": sum(r["hits_verified"] for r in runs.values()),
        "command": "python benchmarks/wavegen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = [[name, r["stats"]["hit_rate"], r["stats"]["hits"], r["hits_verified"], r["mismatches"], r["speedup"],
             r["hit_ms"], r["fresh_ms_of_hits"], r["stats"]["invalidated_entries"], r["stats"]["evictions"],
             r["migrated_examples"], r["context_change_invalidated"], r["slow_change_invalidated"],
             r["entries_before_changes"]] for name, r in runs.items()]
    print(markdown_table(["run", "hit rate", "hits", "hits verified", "mismatches", "speed-up", "hit ms",
                          "fresh ms", "invalidated in stream", "evicted", "migrated", "context step invalidates",
                          "slow step invalidates", "entries then"], rows))
    write_json(args.out.with_suffix(".json"), report)
    plot(report, args.out.with_suffix(".png"))
    print(f"all hits equal a fresh generation: {report['all_hits_correct']} ({report['hits_verified']} checked)")
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return report


if __name__ == "__main__":
    main()
