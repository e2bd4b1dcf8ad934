"""`reso-hf eval --model DIR [--data FILE ...]`: held-out loss and perplexity through the local `evaluate`
module in `reso_hf/metrics/perplexity`, plus greedy generation samples (with ResoLLM's stability telemetry
when the model returns it). Writes `eval_results.json` (atomically).

`eval_results.json` (schema "reso-hf/eval_results/v1"), read by the model-card renderer:

    schema      "reso-hf/eval_results/v1"
    created_at  ISO-8601 UTC time
    model       the evaluated folder or Hub id
    dataset     {"name" (Hub id, file names or the bundled sample; never a path), "source", "id" (Hub dataset id or
                 null), "split" ("test" for --data and eval_data_files, the Hub eval_split, or the rows held out
                 of train), "rows", "malformed_rows", "block_size", "packing", "assistant_only_loss" (default: how
                 the model was trained, from its run_summary.json), "assistant_only_loss_from"}
    metrics     [{"type": "loss" | "perplexity", "name": ..., "value": ...}]   (model-index style)
    loss, perplexity, tokens              (the same numbers, flat)
    stability   output of the local `stability` metric over the samples (ResoLLM only, else null)
    samples     [{"prompt", "reference", "completion", "stability", "lyapunov"}]
"""

from __future__ import annotations

import json
import os

import evaluate as hf_evaluate
import torch
from torch.utils.data import DataLoader
from transformers import default_data_collator

from ..loading import load_causal_lm, load_tokenizer, resolve_model_source
from ..metrics import metric_path
from .arguments import (
    DEFAULT_ASSISTANT_ONLY_LOSS,
    DataArguments,
    EvalArguments,
    parse_recipe,
)
from .data import (
    IGNORE_INDEX,
    build_datasets,
    check_vocabulary,
    load_raw_splits,
    parse_guanaco,
    resolve_chat_template,
)
from ..hub import write_card
from .reporting import RUN_SUMMARY_NAME, utc_now, write_json

ARGUMENT_TYPES = (EvalArguments, DataArguments)
EVAL_RESULTS_NAME = "eval_results.json"
EVAL_RESULTS_SCHEMA = "reso-hf/eval_results/v1"


@torch.no_grad()
def held_out_loss(model, dataset, batch_size: int) -> dict:
    """Token-weighted loss and perplexity over packed blocks (or padded documents)."""
    metric = hf_evaluate.load(metric_path("perplexity"))
    model.eval()
    for batch in DataLoader(dataset.with_format("torch"), batch_size=batch_size, collate_fn=default_data_collator):
        batch = {key: value.to(model.device) for key, value in batch.items()}
        output = model(**batch, use_cache=False)
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if targets:
            metric.add_batch(nll_sum=[output.loss.item() * targets], token_count=[targets])
    return metric.compute()


@torch.no_grad()
def generation_samples(model, tokenizer, conversations: list[list[dict]], template: str, max_new_tokens: int) -> list:
    """Greedy answers to the first human turn of each conversation."""
    samples = []
    model.eval()
    for messages in conversations:
        prompt = messages[:1]
        inputs = tokenizer.apply_chat_template(prompt, chat_template=template, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                return_dict_in_generate=True, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        new_tokens = output.sequences[0, inputs["input_ids"].shape[1]:]
        stability = getattr(output, "stability", None)
        lyapunov = getattr(output, "lyapunov", None)
        samples.append({"prompt": prompt[0]["content"], "reference": messages[1]["content"],
                        "completion": tokenizer.decode(new_tokens, skip_special_tokens=True),
                        "stability": stability[0] if stability else None,
                        "lyapunov": lyapunov[0] if lyapunov else None})
    return samples


def stability_statistics(samples: list[dict]) -> dict | None:
    if not samples or any(sample["stability"] is None for sample in samples):
        return None
    metric = hf_evaluate.load(metric_path("stability"))
    return metric.compute(stability=[s["stability"] for s in samples], lyapunov=[s["lyapunov"] for s in samples])


def evaluation_split(data_args: DataArguments, data: list[str] | None) -> tuple[str, str, str]:
    """(the split of `build_datasets` to evaluate, its dataset name and its split name as recorded).

    With --data: every row of those files, recorded as their `test` split (held-out data given for evaluation).
    Without: the eval split of the data arguments: the Hub dataset's eval_split, `test` for eval_data_files, or
    the rows held out of train (eval_fraction, split_seed)."""
    if data:
        data_args.data_files, data_args.eval_data_files = list(data), None
        data_args.use_bundled_sample, data_args.eval_fraction = False, 0.0
        return "train", data_args.display_name(), "test"  # build_datasets calls the whole files "train"
    if data_args.eval_data_files:
        return "eval", ", ".join(os.path.basename(path) for path in data_args.eval_data_files), "test"
    if not (data_args.use_bundled_sample or data_args.data_files) and data_args.eval_split:
        return "eval", data_args.display_name(), data_args.eval_split
    return "eval", data_args.display_name(), (f"train, held-out {data_args.eval_fraction:g} "
                                              f"(split_seed {data_args.split_seed})")


def trained_assistant_only_loss(model: str) -> bool | None:
    """How the model in folder `model` was trained (its run_summary.json), or None when not recorded."""
    path = os.path.join(model, RUN_SUMMARY_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle).get("data", {}).get("assistant_only_loss")
    return value if isinstance(value, bool) else None


def resolve_loss_tokens(eval_args: EvalArguments, data_args: DataArguments) -> str:
    """Set `data_args.assistant_only_loss` when it was not given, and say where its value comes from: the
    model's own training (run_summary.json), else the default (assistant tokens only)."""
    if data_args.assistant_only_loss is not None:
        return "--assistant_only_loss"
    trained = trained_assistant_only_loss(eval_args.model)
    if trained is not None:
        data_args.assistant_only_loss = trained
        return f"as the model was trained ({RUN_SUMMARY_NAME})"
    data_args.assistant_only_loss = DEFAULT_ASSISTANT_ONLY_LOSS
    return f"default: the model folder has no {RUN_SUMMARY_NAME}"


def run(eval_args: EvalArguments, data_args: DataArguments, data: list[str] | None = None) -> dict:
    if not eval_args.model:
        raise ValueError("--model is required (a model folder or Hub id)")
    split, dataset_name, split_name = evaluation_split(data_args, data)
    source = resolve_model_source(eval_args.model, field="--model")  # a bad path fails before anything loads
    loss_tokens_from = resolve_loss_tokens(eval_args, data_args)
    tokenizer = load_tokenizer(source, trust_remote_code=eval_args.trust_remote_code)
    model = load_causal_lm(source, trust_remote_code=eval_args.trust_remote_code)
    check_vocabulary(tokenizer, model, eval_args.model)
    train, evaluation, stats = build_datasets(data_args, tokenizer)
    dataset = train if split == "train" else evaluation
    if dataset is None:
        raise ValueError("no evaluation split: pass --data FILE, --eval_data_files, or eval_fraction > 0")
    scores = held_out_loss(model, dataset, eval_args.batch_size)
    raw_train, raw_eval = load_raw_splits(data_args)
    raw = raw_train if split == "train" else raw_eval
    conversations = []
    for row in raw:
        if len(conversations) == eval_args.num_samples:
            break
        if _well_formed(row[data_args.text_field]):
            conversations.append(parse_guanaco(row[data_args.text_field]))
    template = resolve_chat_template(tokenizer, data_args.chat_template)
    samples = generation_samples(model, tokenizer, conversations, template, eval_args.max_new_tokens)
    summary = stats.to_dict()
    results = {
        "schema": EVAL_RESULTS_SCHEMA,
        "created_at": utc_now(),
        "model": eval_args.model,
        "dataset": {"name": dataset_name, "source": data_args.source(), "id": data_args.hub_dataset_id(),
                    "split": split_name, "rows": summary["rows"].get(split),
                    "malformed_rows": summary["malformed_rows"].get(split), "block_size": data_args.block_size,
                    "packing": data_args.packing, "assistant_only_loss": data_args.assistant_only_loss,
                    "assistant_only_loss_from": loss_tokens_from},
        "metrics": [{"type": "loss", "name": "held-out loss (nats/token)", "value": scores["loss"]},
                    {"type": "perplexity", "name": "held-out perplexity", "value": scores["perplexity"]}],
        **scores,
        "stability": stability_statistics(samples),
        "samples": samples,
    }
    output_file = eval_args.output_file or os.path.join(eval_args.model, EVAL_RESULTS_NAME)
    write_json(output_file, results)
    if os.path.dirname(os.path.abspath(output_file)) == os.path.abspath(eval_args.model):
        write_card(eval_args.model)  # the card's model-index comes from these measured results
    return results


def _well_formed(text) -> bool:
    from .data import MalformedRowError

    try:
        parse_guanaco(text)
    except MalformedRowError:  # malformed rows are counted by build_datasets; they give no sample
        return False
    return True


def main(recipe: str | None, argv: list[str]) -> int:
    argv = list(argv)
    data = None
    if "--data" in argv:  # `--data FILE [FILE ...]`: shorthand for evaluating on whole local files
        index = argv.index("--data")
        end = next((i for i in range(index + 1, len(argv)) if argv[i].startswith("--")), len(argv))
        data, argv = argv[index + 1: end], argv[:index] + argv[end:]
        if not data:
            raise ValueError("--data needs at least one file (jsonl, parquet or arrow)")
    eval_args, data_args = parse_recipe(ARGUMENT_TYPES, recipe, argv)
    results = run(eval_args, data_args, data)
    dataset = results["dataset"]
    scored = "assistant tokens only" if dataset["assistant_only_loss"] else "every token"
    print(f"loss {results['loss']:.4f}  perplexity {results['perplexity']:.2f}  ({results['tokens']} tokens; loss on "
          f"{scored}, {dataset['assistant_only_loss_from']}; {dataset['name']}, split {dataset['split']})")
    for sample in results["samples"]:
        print(f"### Human: {sample['prompt']}\n### Assistant: {sample['completion']}\n")
    return 0
