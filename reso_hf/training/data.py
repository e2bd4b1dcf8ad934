"""Guanaco data for training and evaluation (SPEC §6).

Data flow, one function per step:

    load_raw_splits   -> datasets with a text column (Hub id, local jsonl/parquet/arrow, or the bundled sample)
    parse_guanaco     -> "### Human: ...### Assistant: ..." text into chat messages; malformed rows
                         are skipped and counted (or rejected in strict mode)
    tokenize_messages -> one document: token ids + labels (assistant tokens only by default), ending in EOS
    pack_documents    -> fixed blocks of `block_size` tokens; position ids restart at every document so
                         no attention crosses a boundary (transformers' `create_causal_mask` turns the
                         restarts into a block-diagonal mask when no attention_mask is passed) and the
                         first token of each document is never a target.

`build_datasets` chains them for Trainer, in memory or streaming.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import datasets
from datasets import Dataset, IterableDataset, load_dataset

from ..modeling.tokenization_reso_llm import GUANACO_CHAT_TEMPLATE

IGNORE_INDEX = -100
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_MARKER = re.compile(r"(### Human:|### Assistant:)")
CHAT_TEMPLATE_CHOICES = ("auto", "model", "guanaco")
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class MalformedRowError(ValueError):
    """A row that is not a guanaco conversation (the message says why)."""


class DataSourceError(RuntimeError):
    """The data could not be loaded; the message says how to pass local files."""


# ----------------------------------------------------------------------------------------------------------
# Parsing


def parse_guanaco(text) -> list[dict]:
    """`### Human: q### Assistant: a### Human: ...` -> [{"role": "user", ...}, {"role": "assistant", ...}, ...].

    Raises MalformedRowError when the text is not a str, is empty, has text before the first marker,
    does not start with a human turn, has an empty turn, or has no assistant turn.
    """
    if not isinstance(text, str):
        raise MalformedRowError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise MalformedRowError("empty text")
    pieces = _MARKER.split(text)
    if pieces[0].strip():
        raise MalformedRowError(f"text before the first '{HUMAN}' marker: {pieces[0][:40]!r}")
    if len(pieces) < 2 or pieces[1] != HUMAN:
        raise MalformedRowError(f"the conversation must start with '{HUMAN}'")
    messages = []
    for marker, content in zip(pieces[1::2], pieces[2::2]):
        role = "user" if marker == HUMAN else "assistant"
        if not content.strip():
            raise MalformedRowError(f"empty {role} turn (turn {len(messages)})")
        messages.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRowError(f"no '{ASSISTANT}' turn")
    return messages


def _parse_batch(batch: dict, text_field: str) -> dict:
    """Batched `map`: adds `messages` ([] when malformed) and `malformed` (the reason, "" when fine)."""
    messages, reasons = [], []
    for text in batch[text_field]:
        try:
            messages.append(parse_guanaco(text))
            reasons.append("")
        except MalformedRowError as error:  # recorded in the `malformed` column and counted by the caller
            messages.append([])
            reasons.append(str(error))
    return {"messages": messages, "malformed": reasons}


# ----------------------------------------------------------------------------------------------------------
# Formatting and tokenization


def resolve_chat_template(tokenizer, choice: str) -> str:
    """The Jinja template used to format conversations: the model's own ("model"), guanaco's ("guanaco"),
    or the model's own when it has one, else guanaco's ("auto")."""
    if choice not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_CHOICES}, got {choice!r}")
    own = getattr(tokenizer, "chat_template", None)
    if choice == "model" and not own:
        raise ValueError("chat_template='model' but the tokenizer has no chat template; use 'guanaco' or 'auto'")
    if choice == "guanaco" or not own:
        return GUANACO_CHAT_TEMPLATE
    return own


def _render(tokenizer, messages, template, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(tokenizer, messages: list[dict], template: str, text: str) -> list[tuple[int, int]]:
    """Character spans of `text` that the model must produce for each assistant message: everything the
    template adds for that message after the generation prompt (content, end-of-turn token, ...)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], template)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ValueError(
                "the chat template is not prefix-stable (rendering the first turns is not a prefix of the "
                "whole conversation), so assistant tokens cannot be located; use chat_template='guanaco'"
            )
        spans.append((len(prompt), len(upto)))
    return spans


def tokenize_messages(tokenizer, messages: list[dict], template: str, assistant_only: bool) -> tuple[list, list]:
    """One document: (input_ids, labels). Labels are -100 outside the assistant spans when
    `assistant_only`; a token is an assistant token when its characters overlap an assistant span.
    The document always ends with exactly one EOS, labelled like the token before it."""
    text = _render(tokenizer, messages, template)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if assistant_only:
        spans = assistant_char_spans(tokenizer, messages, template, text)
        keep = [any(_overlaps(offset, span) for span in spans) for offset in encoding["offset_mapping"]]
    else:
        keep = [True] * len(ids)
    labels = [token if k else IGNORE_INDEX for token, k in zip(ids, keep)]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; documents must be separated by EOS")
    if not ids or ids[-1] != eos:
        ids.append(eos)
        labels.append(eos if (not assistant_only or (labels and labels[-1] != IGNORE_INDEX)) else IGNORE_INDEX)
    return ids, labels


def _overlaps(offset, span) -> bool:
    start, end = offset
    if start == end:  # zero-width offsets (trimmed whitespace): inside if the position is
        return span[0] <= start < span[1]
    return start < span[1] and end > span[0]


# ----------------------------------------------------------------------------------------------------------
# Packing


def pack_documents(documents: list[tuple[list, list]], block_size: int, pad_token_id: int) -> dict:
    """Pack (ids, labels) documents into blocks of exactly `block_size` tokens.

    A document that does not fit in the room left is cut; each piece is its own segment: position ids
    restart at 0 and its first label is -100 (nothing before it in the segment predicts it). The last
    block is filled with a padding segment (labels -100). Returns columns input_ids, labels, position_ids.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    blocks = {"input_ids": [], "labels": [], "position_ids": []}
    current = {"input_ids": [], "labels": [], "position_ids": []}

    def add_segment(ids, labels):
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + labels[1:]
        current["position_ids"] += list(range(len(ids)))
        if len(current["input_ids"]) == block_size:
            for key in blocks:
                blocks[key].append(current[key])
                current[key] = []

    for ids, labels in documents:
        while ids:
            room = block_size - len(current["input_ids"])
            add_segment(ids[:room], labels[:room])
            ids, labels = ids[room:], labels[room:]
    room = block_size - len(current["input_ids"])
    if 0 < room < block_size:
        add_segment([pad_token_id] * room, [IGNORE_INDEX] * room)
    return blocks


def _tokenize_batch(batch, tokenizer, template, assistant_only, block_size, packing):
    documents = [tokenize_messages(tokenizer, m, template, assistant_only) for m in batch["messages"]]
    if packing:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return pack_documents(documents, block_size, pad)
    return {"input_ids": [ids[:block_size] for ids, _ in documents],
            "labels": [labels[:block_size] for _, labels in documents]}


# ----------------------------------------------------------------------------------------------------------
# Loading


def bundled_sample_path() -> str:
    """The guanaco-format sample written for the project and shipped with the package (121 rows)."""
    return str(resources.files("reso_hf").joinpath("data/guanaco_sample.jsonl"))


def _builder_for(files: list[str]) -> str:
    builders = set()
    for path in files:
        suffix = Path(path).suffix.lower()
        if suffix not in DATA_FILE_BUILDERS:
            raise ValueError(f"data_files: unsupported extension {suffix!r} in {path!r}; "
                             f"allowed: {sorted(DATA_FILE_BUILDERS)}")
        if not Path(path).exists():
            raise FileNotFoundError(f"data_files: {path!r} does not exist")
        builders.add(DATA_FILE_BUILDERS[suffix])
    if len(builders) != 1:
        raise ValueError(f"data_files must all have the same format, got {sorted(builders)}")
    return builders.pop()


HOW_TO_PASS_LOCAL_FILES = (
    "Pass local files instead: `--data_files train.jsonl [--eval_data_files eval.jsonl]` (jsonl, parquet or "
    "arrow with a `text` column in the guanaco '### Human: ...### Assistant: ...' format), or "
    "`--use_bundled_sample true` for the small sample shipped with reso-hf. A dataset already in the local "
    "Hugging Face cache loads with HF_HUB_OFFLINE=1."
)


def _check_hub_reachable(dataset_name: str) -> None:
    """Fail at once (instead of minutes of retries) when the Hub is unreachable or offline mode is on."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # datasets answers at once in offline mode (cache hit or a clear error)
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as error:
        raise DataSourceError(
            f"Cannot load the Hub dataset {dataset_name!r}: {host} is unreachable ({error}). {HOW_TO_PASS_LOCAL_FILES}"
        ) from error


def load_raw_splits(data_args) -> tuple:
    """(train, eval or None) with at least the text column, from the source the arguments name."""
    streaming = data_args.streaming
    if data_args.use_bundled_sample or data_args.data_files:
        files = [bundled_sample_path()] if data_args.use_bundled_sample else list(data_args.data_files)
        data_files = {"train": files}
        if data_args.eval_data_files:
            data_files["eval"] = list(data_args.eval_data_files)
        builder = _builder_for([f for split in data_files.values() for f in split])
        raw = load_dataset(builder, data_files=data_files, streaming=streaming)
        train, evaluation = raw["train"], raw.get("eval")
    else:
        if not os.path.isdir(data_args.dataset_name):
            _check_hub_reachable(data_args.dataset_name)
        try:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config, streaming=streaming)
        except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
            raise DataSourceError(
                f"Cannot load the dataset {data_args.dataset_name!r} ({error}). {HOW_TO_PASS_LOCAL_FILES}"
            ) from error
        if data_args.train_split not in raw:
            raise ValueError(f"train_split {data_args.train_split!r} not in the dataset; allowed: {list(raw)}")
        train = raw[data_args.train_split]
        evaluation = raw[data_args.eval_split] if data_args.eval_split and data_args.eval_split in raw else None
    return _hold_out(train, evaluation, data_args)


def _hold_out(train, evaluation, data_args):
    """Cut an eval split from train when none was given (`eval_fraction`, or `max_eval_samples` when streaming)."""
    if evaluation is not None or data_args.eval_fraction <= 0:
        return train, evaluation
    if isinstance(train, IterableDataset):
        if not data_args.max_eval_samples:
            raise ValueError("streaming without an eval split needs max_eval_samples (rows taken from the "
                             "start of train for evaluation) or eval_fraction=0")
        return train.skip(data_args.max_eval_samples), train.take(data_args.max_eval_samples)
    parts = train.train_test_split(test_size=data_args.eval_fraction, seed=data_args.split_seed)
    return parts["train"], parts["test"]


# ----------------------------------------------------------------------------------------------------------
# The whole pipeline


@dataclass
class DataStats:
    """What happened to the rows; goes into run_summary.json (`data` field)."""

    rows: dict = field(default_factory=dict)  # split -> rows read (None when streaming: not known up front)
    malformed: dict = field(default_factory=dict)  # split -> {reason: count}
    examples: dict = field(default_factory=dict)  # split -> rows after packing / tokenization

    def to_dict(self) -> dict:
        return {"rows": self.rows, "malformed_rows": {s: sum(c.values()) for s, c in self.malformed.items()},
                "malformed_reasons": self.malformed, "examples": self.examples}


def _parsed(split_name, dataset, data_args, stats: DataStats):
    limit = data_args.max_train_samples if split_name == "train" else data_args.max_eval_samples
    if limit is not None and isinstance(dataset, Dataset):
        dataset = dataset.select(range(min(limit, len(dataset))))
    elif limit is not None:
        dataset = dataset.take(limit)
    dataset = dataset.map(_parse_batch, batched=True, fn_kwargs={"text_field": data_args.text_field})
    if isinstance(dataset, Dataset):
        reasons = [r for r in dataset["malformed"] if r]
        stats.rows[split_name] = len(dataset)
        stats.malformed[split_name] = dict(Counter(reasons))
        if reasons and data_args.strict:
            first = dataset["malformed"].index(reasons[0])
            raise MalformedRowError(f"{split_name} row {first} is malformed: {reasons[0]} "
                                    f"({len(reasons)} malformed rows; strict=false skips and counts them)")
    else:
        counter = stats.malformed.setdefault(split_name, {})
        stats.rows[split_name] = None
        dataset = dataset.filter(_count_streaming, fn_kwargs={"counter": counter, "strict": data_args.strict,
                                                              "split": split_name}, input_columns="malformed")
    return dataset.filter(lambda reason: not reason, input_columns="malformed")


def _count_streaming(reason, counter, strict, split):
    if reason and strict:
        raise MalformedRowError(f"{split}: malformed row: {reason} (strict=false skips and counts them)")
    if reason:
        counter[reason] = counter.get(reason, 0) + 1
    return True


def build_datasets(data_args, tokenizer, assistant_only: bool | None = None):
    """(train, eval or None, DataStats): token blocks ready for Trainer and `default_data_collator`
    (packing) or a padding collator (no packing)."""
    assistant_only = data_args.assistant_only_loss if assistant_only is None else assistant_only
    template = resolve_chat_template(tokenizer, data_args.chat_template)
    stats = DataStats()
    train, evaluation = load_raw_splits(data_args)
    result = []
    for name, split in (("train", train), ("eval", evaluation)):
        if split is None:
            result.append(None)
            continue
        parsed = _parsed(name, split, data_args, stats).select_columns(["messages"])
        tokenized = parsed.map(
            _tokenize_batch, batched=True, batch_size=1000, remove_columns=["messages"],
            fn_kwargs=dict(tokenizer=tokenizer, template=template, assistant_only=assistant_only,
                           block_size=data_args.block_size, packing=data_args.packing),
        )
        if isinstance(tokenized, Dataset):
            stats.examples[name] = len(tokenized)
            if len(tokenized) == 0:
                raise ValueError(f"the {name} split has no usable rows after parsing ({stats.to_dict()})")
        result.append(tokenized)
    return result[0], result[1], stats


def read_jsonl_texts(path: str, text_field: str = "text") -> list[str]:
    """The text column of a jsonl file (used by the benchmark and the tokenizer trainer)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)[text_field] for line in handle if line.strip()]
