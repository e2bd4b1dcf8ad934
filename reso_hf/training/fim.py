"""Fill-in-the-middle (FIM) training data: documents cut in three and reordered so that a causal model learns infilling.

With probability `fim_rate` a document's tokens x are cut at two cut points drawn uniformly (0 <= i <= j <= len(x))
into prefix x[:i], middle x[i:j] and suffix x[j:], and rearranged as

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle

(SPM with probability `spm_rate` among the FIM documents, PSM otherwise). Labels move with their tokens; the three
sentinel tokens get no label (-100). The draw of a document depends only on (seed, its token ids), so it is the same
whatever the batching or the order of the rows. At inference `fill_in_middle(prefix, suffix)` builds the prompt
whose continuation is the middle.
"""

from __future__ import annotations

import hashlib
import random
from typing import Optional

from .data import IGNORE_INDEX

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"
FIM_TOKENS = (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)
FIM_FORMATS = ("psm", "spm")


def check_rate(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{field} must be a number in [0, 1], got {value!r}.")
    return float(value)


def add_fim_tokens(tokenizer, model=None) -> dict[str, int]:
    """Add the FIM sentinels the tokenizer lacks as special tokens (SmolLM2's tokenizer already has them) and, given
    a model, grow its embeddings to the tokenizer's size. Returns sentinel -> token id."""
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in FIM_TOKENS if token not in vocabulary]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return fim_token_ids(tokenizer)


def fim_token_ids(tokenizer) -> dict[str, int]:
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in FIM_TOKENS if token not in vocabulary]
    if missing:
        raise ValueError(f"the tokenizer has no FIM tokens {missing}; call reso_hf.training.fim.add_fim_tokens("
                         "tokenizer, model) first.")
    return {token: vocabulary[token] for token in FIM_TOKENS}


def _document_rng(ids: list[int], seed: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}:{','.join(map(str, ids))}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def apply_fim(ids: list[int], labels: list[int], token_ids: dict[str, int], fim_rate: float, spm_rate: float = 0.5,
              seed: int = 0) -> tuple[list[int], list[int]]:
    """One document's (ids, labels), FIM-rearranged with probability `fim_rate` (see the module docstring)."""
    if len(ids) != len(labels):
        raise ValueError(f"ids and labels must have the same length, got {len(ids)} and {len(labels)}.")
    rng = _document_rng(ids, seed)
    if rng.random() >= fim_rate:
        return list(ids), list(labels)
    first, second = sorted(rng.randint(0, len(ids)) for _ in range(2))
    prefix, middle, suffix = slice(0, first), slice(first, second), slice(second, len(ids))
    start, between, before_middle = token_ids[FIM_PREFIX], token_ids[FIM_SUFFIX], token_ids[FIM_MIDDLE]
    if rng.random() < spm_rate:
        new_ids = [start, between] + ids[suffix] + [before_middle] + ids[prefix] + ids[middle]
        new_labels = [IGNORE_INDEX] * 2 + labels[suffix] + [IGNORE_INDEX] + labels[prefix] + labels[middle]
    else:
        new_ids = [start] + ids[prefix] + [between] + ids[suffix] + [before_middle] + ids[middle]
        new_labels = [IGNORE_INDEX] + labels[prefix] + [IGNORE_INDEX] + labels[suffix] + [IGNORE_INDEX] + labels[middle]
    return new_ids, new_labels


def fill_in_middle(prefix: str, suffix: str, format: str = "psm", tokenizer: Optional[object] = None) -> str:
    """The prompt whose continuation is the text between `prefix` and `suffix` (PSM or SPM, as in training).

    With a tokenizer, checks that it has the FIM tokens (a model trained without them cannot infill)."""
    if format not in FIM_FORMATS:
        raise ValueError(f"format must be one of {list(FIM_FORMATS)}, got {format!r}.")
    if tokenizer is not None:
        fim_token_ids(tokenizer)
    if format == "spm":
        return f"{FIM_PREFIX}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}{prefix}"
    return f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
