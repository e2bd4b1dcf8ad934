"""Fill-in-the-middle (issue 14): infill loss of a model pretrained with `--fim_rate 0.5` vs without, equal budget.

Two tiny ResoLLMs are pretrained with `reso-hf train` (the real command, in process) on the same documents, with the
same tokenizer (the byte-level default plus the three FIM sentinels, saved once and passed as `--tokenizer`, so both
models have the same vocabulary and size), the same steps, batch, block size, learning rate schedule and seed: the
only difference is `--fim_rate 0.5` (PSM and SPM half and half, `--fim_spm_rate 0.5`) vs `--fim_rate 0`.

Data: the guanaco eval split (/work/shared/data/guanaco), rows split by index: the first 80% are the training
documents, the last 20% held out (nothing is tuned on them). `--quick` uses the bundled 121-row sample instead.

Every document (training and held-out) is cut to --doc-tokens bytes (default block - 8; the default tokenizer has one
token per byte): the human turn and the start of the answer, still a guanaco conversation. FIM rearranges whole
documents before packing, so a document longer than a block would have its middle in another block than its
prefix and suffix; cut to fit, every FIM document is learnable in one block.

Measured on the held-out documents (for each one a middle span is cut at two points drawn with a fixed seed,
4 <= len(middle) <= len(doc) / 2, EOS not in the middle):
  infill loss (PSM)        mean NLL per middle token of `<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle`
  prefix-only loss         mean NLL per middle token of `prefix middle` (what a left-to-right model can do)
  ... (short)              the same two with a second draw of middles of 4..16 tokens (added after the first run
                           showed no gain on the uniform middles, whose tokens are mostly far from the suffix)
  next-token loss          mean NLL per token of the whole held-out document, plain (the cost of FIM training)
For the model trained without FIM, the sentinels are tokens it never saw: its best infill is the prefix-only loss,
so the FIM gain is  best(no-FIM PSM, no-FIM prefix-only) - FIM PSM  and the cost is the ratio of next-token losses.

    python benchmarks/fim.py                 # about 7 minutes on 2 cores
    python benchmarks/fim.py --quick              # seconds (tests)

Writes benchmarks/results/fim[_quick].json and .png (atomically) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _generation_common import RESULTS, save_figure, write_json  # noqa: E402
from dynamic_lora_common import markdown_table  # noqa: E402

import reso_hf  # noqa: E402
from reso_hf.training import commands  # noqa: E402
from reso_hf.training.data import bundled_sample_path  # noqa: E402
from reso_hf.training.fim import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, add_fim_tokens  # noqa: E402

GUANACO_EVAL = Path("/work/shared/data/guanaco/openassistant_best_replies_eval.jsonl")
TRAIN_FRACTION = 0.8
RUNS = {"no_fim": 0.0, "fim_0.5": 0.5}
SHORT_MIDDLE = 16  # the second protocol: middles of 4..16 tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of each pretraining run")
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    parser.add_argument("--block", type=int, default=512, help="block_size (tokens per packed row)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--eval-docs", type=int, default=100, help="held-out documents evaluated")
    parser.add_argument("--doc-tokens", type=int, default=None,
                        help="every document (training and held-out) is cut to this many bytes = tokens, so that a "
                             "FIM-rearranged document fits in one block (default: block - 8)")
    parser.add_argument("--config-overrides", default="{}", help="ResoLLMConfig fields over the tiny preset (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="bundled sample, a micro model, 4 steps")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/fim[_quick])")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.block, args.eval_docs = 4, 4, 64, 6
        args.config_overrides = json.dumps(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2))
    if args.doc_tokens is None:
        args.doc_tokens = args.block - 8
    if args.out is None:
        args.out = RESULTS / ("fim_quick" if args.quick else "fim")
    return args


def documents(quick: bool) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the eval split cut by row index (the bundled sample with --quick)."""
    source = Path(bundled_sample_path()) if quick or not GUANACO_EVAL.is_file() else GUANACO_EVAL
    with open(source, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    cut = int(len(texts) * TRAIN_FRACTION)
    return texts[:cut], texts[cut:]


def shorten(text: str, max_bytes: int) -> str:
    """The conversation cut to at most `max_bytes` UTF-8 bytes (one token per byte with the default tokenizer), still
    in the guanaco format: the human turn (at most half the room) and as much of the first assistant turn as fits."""
    human, _, assistant = text.partition("### Assistant:")
    assistant = assistant.split("### Human:")[0]

    def cut(part: str, room: int) -> str:
        while len(part.encode("utf-8")) > room:
            part = part[: max(0, len(part) - max(1, (len(part.encode("utf-8")) - room) // 4))]
        return part

    human = cut(human, max_bytes // 2)
    head = human + "### Assistant:"
    return head + cut(assistant, max_bytes - len(head.encode("utf-8")))


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def pretrain(name: str, fim_rate: float, work: Path, tokenizer_dir: Path, train_file: Path, args) -> dict:
    output = work / name
    argv = ["--model_preset", "tiny", "--tokenizer", str(tokenizer_dir), "--config_overrides", args.config_overrides,
            "--data_files", str(train_file), "--eval_fraction", "0", "--block_size", str(args.block),
            "--packing", "true", "--assistant_only_loss", "false", "--chat_template", "guanaco",
            "--fim_rate", str(fim_rate), "--fim_spm_rate", "0.5", "--fim_seed", str(args.seed),
            "--output_dir", str(output), "--overwrite_output_dir", "true", "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch), "--learning_rate", str(args.lr),
            "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, args.steps // 20)),
            "--weight_decay", "0.01", "--logging_steps", str(max(1, args.steps // 10)), "--eval_strategy", "no",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--seed", str(args.seed),
            "--disable_tqdm", "true"]
    start = time.perf_counter()
    code = commands.run("train", argv)
    if code != 0:
        raise RuntimeError(f"reso-hf train {' '.join(argv)} exited with {code}")
    summary = json.loads((output / "run_summary.json").read_text(encoding="utf-8"))
    model = reso_hf.ResoLLMForCausalLM.from_pretrained(output / "model").eval()
    return {"model": model, "seconds": time.perf_counter() - start, "summary": summary}


def cut_points(length: int, rng: random.Random, longest: int | None = None) -> tuple[int, int]:
    """A middle of 4 .. length/2 tokens (at most `longest`), anywhere in a document of `length` tokens (EOS
    excluded)."""
    span = rng.randint(4, max(4, min(length // 2, longest or length)))
    start = rng.randint(0, length - span)
    return start, start + span


def span_nll(model, ids: list[int], first_scored: int, last_scored: int) -> tuple[float, int]:
    """Summed NLL of ids[first_scored:last_scored] given what precedes each, and the count."""
    tensor = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=tensor).logits[0].float()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    targets = tensor[0, 1:]
    positions = torch.arange(first_scored - 1, last_scored - 1)
    return float(-log_probs[positions, targets[positions]].sum()), len(positions)


def evaluate(model, tokenizer, held_out: list[str], args) -> dict:
    sentinels = {token: tokenizer.convert_tokens_to_ids(token) for token in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}
    rng, short_rng = random.Random(args.seed), random.Random(args.seed + 1)
    totals = {key: [0.0, 0] for key in ("infill_psm", "prefix_only", "infill_psm_short", "prefix_only_short",
                                        "next_token")}

    def infill(ids, start, end):
        prefix, middle, suffix = ids[:start], ids[start:end], ids[end:]
        psm = [sentinels[FIM_PREFIX], *prefix, sentinels[FIM_SUFFIX], *suffix, sentinels[FIM_MIDDLE], *middle]
        # a BOS-less causal model cannot score its first token: the prefix-only view starts with the EOS separator
        # it saw between packed documents
        plain = [tokenizer.eos_token_id, *prefix, *middle]
        return (span_nll(model, psm, len(psm) - len(middle), len(psm)),
                span_nll(model, plain, 1 + len(prefix), len(plain)))

    for text in held_out[:args.eval_docs]:
        ids = tokenizer(text)["input_ids"][:args.doc_tokens] + [tokenizer.eos_token_id]
        body = len(ids) - 1
        if body < 12:
            continue
        measured = dict(zip(("infill_psm", "prefix_only"), infill(ids, *cut_points(body, rng))))
        measured.update(zip(("infill_psm_short", "prefix_only_short"),
                            infill(ids, *cut_points(body, short_rng, SHORT_MIDDLE))))
        measured["next_token"] = span_nll(model, [tokenizer.eos_token_id, *ids], 1, 1 + len(ids))
        for key, (nll, count) in measured.items():
            totals[key][0] += nll
            totals[key][1] += count
    return {key: total / count for key, (total, count) in totals.items()} | {
        "middle_tokens": totals["infill_psm"][1], "documents": min(args.eval_docs, len(held_out))}


def plot(report: dict, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(9, 4))
    metrics = ("infill_psm", "prefix_only", "infill_psm_short", "prefix_only_short", "next_token")
    labels = ("infill (PSM)", "prefix only", "short: infill", "short: prefix only", "next-token")
    width = 0.38
    for offset, name in ((-width / 2, "no_fim"), (width / 2, "fim_0.5")):
        values = [report["runs"][name]["eval"][m] for m in metrics]
        bars = axis.bar([i + offset for i in range(len(metrics))], values, width, label=name)
        axis.bar_label(bars, fmt="%.3f", fontsize=8)
    axis.set_xticks(range(len(metrics)), labels)
    axis.set_ylabel("mean NLL per token (nats)")
    axis.set_title(f"FIM vs no FIM at equal budget ({report['steps']} steps x {report['batch']} x {report['block']} "
                   "tokens)")
    axis.legend(loc="upper right")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    train_texts, held_out = documents(args.quick)
    train_texts = [shorten(t, args.doc_tokens) for t in train_texts]
    held_out = [shorten(t, args.doc_tokens) for t in held_out]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reso_hf_fim_") as scratch:
        work = args.work_dir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = reso_hf.create_default_tokenizer()
        add_fim_tokens(tokenizer)
        tokenizer.save_pretrained(work / "tokenizer")
        train_file = work / "train.jsonl"
        write_jsonl(train_file, train_texts)
        runs = {}
        for name, rate in RUNS.items():
            print(f"pretraining {name} (--fim_rate {rate}) ...", flush=True)
            trained = pretrain(name, rate, work, work / "tokenizer", train_file, args)
            runs[name] = {"fim_rate": rate, "train_seconds": trained["seconds"],
                          "train_loss": trained["summary"]["training"]["train_loss"],
                          "global_step": trained["summary"]["training"]["global_step"],
                          "train_blocks": trained["summary"]["data"]["examples"].get("train"),
                          "parameters": sum(p.numel() for p in trained["model"].parameters()),
                          "eval": evaluate(trained["model"], tokenizer, held_out, args)}
    fim, plain = runs["fim_0.5"]["eval"], runs["no_fim"]["eval"]
    best_plain_infill = min(plain["infill_psm"], plain["prefix_only"])
    best_plain_short = min(plain["infill_psm_short"], plain["prefix_only_short"])
    report = {
        "steps": args.steps, "batch": args.batch, "block": args.block, "lr": args.lr, "seed": args.seed,
        "tokens_per_run": args.steps * args.batch * args.block, "train_documents": len(train_texts),
        "held_out_documents": len(held_out), "quick": args.quick, "runs": runs,
        "infill_gain_nats": best_plain_infill - fim["infill_psm"],
        "infill_ratio_fim_to_best_plain": fim["infill_psm"] / best_plain_infill,
        "short_infill_gain_nats": best_plain_short - fim["infill_psm_short"],
        "short_infill_ratio_fim_to_best_plain": fim["infill_psm_short"] / best_plain_short,
        "next_token_cost_ratio": fim["next_token"] / plain["next_token"],
        "seconds": time.perf_counter() - started,
        "command": "python benchmarks/fim.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = [[name, run["fim_rate"], run["eval"]["infill_psm"], run["eval"]["prefix_only"],
             run["eval"]["infill_psm_short"], run["eval"]["prefix_only_short"], run["eval"]["next_token"],
             run["train_loss"], run["train_seconds"]] for name, run in runs.items()]
    print(markdown_table(["run", "fim_rate", "infill loss (PSM)", "middle given prefix only", "short: infill (PSM)",
                          "short: prefix only", "held-out next-token loss", "train loss", "train s"], rows))
    print(f"infill: FIM {fim['infill_psm']:.3f} vs best without FIM {best_plain_infill:.3f} nats/token "
          f"(ratio {report['infill_ratio_fim_to_best_plain']:.3f}); short middles: FIM {fim['infill_psm_short']:.3f} vs "
          f"{best_plain_short:.3f} (ratio {report['short_infill_ratio_fim_to_best_plain']:.3f}); next-token cost ratio "
          f"{report['next_token_cost_ratio']:.3f}")
    write_json(args.out.with_suffix(".json"), report)
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return report


if __name__ == "__main__":
    main()
