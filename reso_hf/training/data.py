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

A local file that cannot be used (empty, a line that is not JSON or not UTF-8, no text column, too few rows to
hold out an eval split) is a `DataFileError` naming the file, the line and the problem. Every row keeps its
position in its source (`source_row`), so that a malformed row is reported by file and line.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
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

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
SOURCE_ROW = "source_row"  # the row's position in its split's files (or Hub split), kept through shuffling
HUMAN, ASSISTANT = "### Human:", "### Assistant:"
_MARKER = re.compile(r"(### Human:|### Assistant:)")
CHAT_TEMPLATE_CHOICES = ("auto", "model", "guanaco")
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class MalformedRowError(ValueError):
    """A row that is not a guanaco conversation (the message says why)."""


class DataSourceError(OSError):
    """The data could not be loaded; the message says how to pass local files."""


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file, the line (when there is one) and why."""


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


def check_vocabulary(tokenizer, model, where: str) -> None:
    """Every token id must index the model's embedding (else training fails deep inside the embedding lookup)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows; use the tokenizer the model was trained with")


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


def _tokenize_batch(batch, tokenizer, template, assistant_only, block_size, packing, fim=None):
    """fim: None, or {"token_ids", "fim_rate", "spm_rate", "seed"} for `fim.apply_fim` on every document."""
    documents = [tokenize_messages(tokenizer, m, template, assistant_only) for m in batch["messages"]]
    if fim is not None:
        from .fim import apply_fim  # fim.py imports this module

        documents = [apply_fim(ids, labels, **fim) for ids, labels in documents]
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


def local_files(data_args) -> dict | None:
    """{"train": [...], "eval": [...]} of the local files the arguments name, or None for a Hub/folder dataset."""
    if not (data_args.use_bundled_sample or data_args.data_files):
        return None
    files = {"train": [bundled_sample_path()] if data_args.use_bundled_sample else list(data_args.data_files)}
    if data_args.eval_data_files:
        files["eval"] = list(data_args.eval_data_files)
    return files


def load_raw_splits(data_args) -> tuple:
    """(train, eval or None) with at least the text column and `source_row`, from the source the arguments name."""
    streaming = data_args.streaming
    files = local_files(data_args)
    if files is not None:
        builder = _builder_for([f for split in files.values() for f in split])
        splits = {name: _load_local_split(builder, paths, data_args.text_field, streaming)
                  for name, paths in files.items()}
        train, evaluation = splits["train"], splits.get("eval")
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
        source = f"dataset {data_args.dataset_name!r}"
        train = _with_source_rows(_require_text_column(raw[data_args.train_split], data_args.text_field, source))
        evaluation = raw[data_args.eval_split] if data_args.eval_split and data_args.eval_split in raw else None
        if evaluation is not None:
            evaluation = _with_source_rows(_require_text_column(evaluation, data_args.text_field, source))
    return _hold_out(train, evaluation, data_args)


def _load_local_split(builder: str, paths: list[str], text_field: str, streaming: bool):
    for path in paths:
        if _is_blank(path):
            raise DataFileError(f"{path}: the file is empty (no rows)")
        if builder == "json" and not _is_utf8(path):  # pyarrow's JSON reader keeps invalid bytes until a row is read
            raise DataFileError(_describe_json_problem(path) or f"{path}: not UTF-8 text; save the file as UTF-8")
    try:
        dataset = load_dataset(builder, data_files={"train": paths}, streaming=streaming)["train"]
    except Exception as error:  # datasets wraps every parse problem in a message with no file or line
        problem = next((p for p in (describe_file_problem(path, builder) for path in paths) if p), None)
        if problem is None:
            raise
        raise DataFileError(problem) from error
    source = paths[0] if len(paths) == 1 else f"data files {paths}"
    dataset = _require_text_column(dataset, text_field, source)
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise DataFileError(f"{source}: no rows")
    return _with_source_rows(dataset)


def _is_blank(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return True
    if DATA_FILE_BUILDERS.get(Path(path).suffix.lower()) != "json" or os.path.getsize(path) > 1 << 20:
        return False
    with open(path, "rb") as handle:
        return not handle.read().strip()


def _is_utf8(path: str) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def describe_file_problem(path: str, builder: str) -> str | None:
    """The first problem of a data file as "PATH line N: problem" (None when none is found)."""
    if builder == "json":
        return _describe_json_problem(path)
    try:
        import pyarrow.parquet as parquet

        if builder == "parquet":
            parquet.read_metadata(path)
        else:
            import pyarrow as arrow

            with open(path, "rb") as handle:
                arrow.ipc.open_stream(handle).read_all()
    except Exception as error:  # pyarrow's errors are many types; the message is what we report
        return f"{path}: not a readable {builder} file ({error})"
    return None


def _describe_json_problem(path: str) -> str | None:
    with open(path, "rb") as handle:
        content = handle.read()
    if path.lower().endswith(".json") and content.lstrip()[:1] in (b"[", b"{"):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # the undecodable line is located line by line below
        if text is not None:
            try:
                json.loads(text)
                return None  # one JSON document: fine as a whole
            except json.JSONDecodeError as error:
                if error.msg != "Extra data":  # "Extra data": JSON Lines in a .json file, checked line by line
                    return f"{path} line {error.lineno}: not valid JSON: {error.msg} (column {error.colno})"
    for number, raw in enumerate(content.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            return (f"{path} line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                    f"{error.start + 1}); save the file as UTF-8")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return f"{path} line {number}: not valid JSON: {error.msg} (column {error.colno})"
        if not isinstance(row, dict):
            return f"{path} line {number}: a row must be a JSON object like {{\"text\": ...}}, got {type(row).__name__}"
    return None


def _require_text_column(dataset, text_field: str, source: str):
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise DataFileError(f"{source}: no {text_field!r} column (columns: {columns}); name the column that holds "
                            f"the '### Human: ...### Assistant: ...' text with --text_field")
    return dataset


def _with_source_rows(dataset):
    if isinstance(dataset, Dataset):
        return dataset.add_column(SOURCE_ROW, list(range(len(dataset))))
    return dataset.map(lambda row, index: {SOURCE_ROW: index}, with_indices=True)


def locate_source_row(data_args, split_name: str, row: int) -> str:
    """Where row `row` (its `source_row`) of a split comes from: "FILE line N" for jsonl files, "FILE row N"
    for the other formats, "SPLIT row N of dataset NAME" for a Hub or folder dataset."""
    files = local_files(data_args)
    if files is None:
        split = data_args.train_split if split_name == "train" else data_args.eval_split
        return f"{split} row {row + 1} of dataset {data_args.dataset_name!r}"
    paths = files["eval"] if split_name == "eval" and "eval" in files else files["train"]
    remaining = row
    for path in paths:
        if Path(path).suffix.lower() == ".jsonl":
            with open(path, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        if remaining == 0:
                            return f"{path} line {number}"
                        remaining -= 1
            continue
        count = _row_count(path)
        if remaining < count:
            return f"{path} row {remaining + 1}"
        remaining -= count
    return f"row {row + 1} of {paths}"


def _row_count(path: str) -> int:
    builder = DATA_FILE_BUILDERS[Path(path).suffix.lower()]
    return len(load_dataset(builder, data_files={"train": [path]})["train"])


def _hold_out(train, evaluation, data_args):
    """Cut an eval split from train when none was given (`eval_fraction`, or `max_eval_samples` when streaming)."""
    if evaluation is not None or data_args.eval_fraction <= 0:
        return train, evaluation
    if isinstance(train, IterableDataset):
        if not data_args.max_eval_samples:
            raise ValueError("streaming without an eval split needs max_eval_samples (rows taken from the "
                             "start of train for evaluation) or eval_fraction=0")
        return train.skip(data_args.max_eval_samples), train.take(data_args.max_eval_samples)
    rows, fraction = len(train), data_args.eval_fraction
    if math.ceil(fraction * rows) < 1 or math.floor((1 - fraction) * rows) < 1:  # datasets' own split sizes
        raise DataFileError(
            f"{data_args.source()}: {rows} row(s) are too few to hold out eval_fraction={fraction} of them for "
            f"evaluation; give more rows, an eval split (--eval_data_files), or --eval_fraction 0")
    parts = train.train_test_split(test_size=fraction, seed=data_args.split_seed)
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
        malformed = dataset["malformed"]
        reasons = [r for r in malformed if r]
        stats.rows[split_name] = len(dataset)
        stats.malformed[split_name] = dict(Counter(reasons))
        if reasons and data_args.strict:
            first_row, first_reason = min((row, reason) for row, reason in zip(dataset[SOURCE_ROW], malformed)
                                          if reason)
            raise MalformedRowError(f"{locate_source_row(data_args, split_name, first_row)}: not a guanaco "
                                    f"conversation: {first_reason} ({len(reasons)} such rows in the {split_name} "
                                    f"split; strict=false skips and counts them)")
        if reasons:
            logger.warning("%s", skipped_rows_message(split_name, len(dataset), stats.malformed[split_name]))
    else:
        counter = stats.malformed.setdefault(split_name, {})
        stats.rows[split_name] = None
        dataset = dataset.filter(_count_streaming, fn_kwargs={"counter": counter, "strict": data_args.strict,
                                                              "split": split_name, "data_args": data_args},
                                 input_columns=["malformed", SOURCE_ROW])
    return dataset.filter(lambda reason: not reason, input_columns="malformed")


def skipped_rows_message(split_name: str, rows: int, reasons: dict) -> str:
    listed = "; ".join(f"{count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda item: -item[1])[:3])
    more = f"; {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
    return (f"{split_name}: skipped {sum(reasons.values())} of {rows} rows that are not guanaco conversations "
            f"({listed}{more}); --strict true stops at the first one and names its line")


def _count_streaming(reason, row, counter, strict, split, data_args):
    if reason and strict:
        raise MalformedRowError(f"{locate_source_row(data_args, split, row)}: not a guanaco conversation: {reason} "
                                f"(strict=false skips and counts them)")
    if reason:
        counter[reason] = counter.get(reason, 0) + 1
    return True


def build_datasets(data_args, tokenizer, assistant_only: bool | None = None):
    """(train, eval or None, DataStats): token blocks ready for Trainer and `default_data_collator`
    (packing) or a padding collator (no packing)."""
    assistant_only = data_args.loss_on_assistant_only() if assistant_only is None else assistant_only
    template = resolve_chat_template(tokenizer, data_args.chat_template)
    fim = None
    if getattr(data_args, "fim_rate", 0.0) > 0:
        from .fim import fim_token_ids  # fim.py imports this module

        # the tokenizer must already hold the sentinels (add_fim_tokens, with the model's embeddings grown)
        fim = {"token_ids": fim_token_ids(tokenizer), "fim_rate": data_args.fim_rate,
               "spm_rate": data_args.fim_spm_rate, "seed": data_args.fim_seed}
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
                           block_size=data_args.block_size, packing=data_args.packing, fim=fim),
        )
        if isinstance(tokenized, Dataset):
            stats.examples[name] = len(tokenized)
            if len(tokenized) == 0:
                raise DataFileError(f"{data_args.source()}: the {name} split has no usable rows (of "
                                    f"{stats.rows.get(name)} rows, none is a guanaco conversation: "
                                    f"{stats.malformed.get(name)})")
        result.append(tokenized)
    return result[0], result[1], stats


def read_jsonl_texts(path: str, text_field: str = "text") -> list[str]:
    """The text column of a jsonl file (used by the benchmark and the tokenizer trainer)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)[text_field] for line in handle if line.strip()]
