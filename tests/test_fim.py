"""Fill-in-the-middle data preparation (reso_hf.training.fim and --fim_rate)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import reso_hf
from reso_hf.training.arguments import DataArguments
from reso_hf.training.data import IGNORE_INDEX, build_datasets
from reso_hf.training.fim import (
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    add_fim_tokens,
    apply_fim,
    fill_in_middle,
    fim_token_ids,
)

TOKENS = {FIM_PREFIX: 1001, FIM_SUFFIX: 1002, FIM_MIDDLE: 1003}


def _document(seed, length=20):
    ids = torch.randint(0, 1000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids, [token + 5000 for token in ids]  # labels tell which token they came with


def _pieces(ids, labels, spm):
    """Undo the rearrangement: (prefix, middle, suffix) of the ids, checking the layout and that labels followed."""
    p, s, m = (ids.index(TOKENS[t]) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    for sentinel in (p, s, m):
        assert labels[sentinel] == IGNORE_INDEX
    assert all(label == token + 5000 for token, label in zip(ids, labels) if token < 1000)
    if spm:
        assert (p, s) == (0, 1) and m > s
        return None, ids[m + 1:], ids[2:m]  # prefix + middle together after <fim_middle>
    assert p == 0 < s < m
    return ids[1:s], ids[m + 1:], ids[s + 1:m]


@pytest.mark.parametrize("seed", range(6))
def test_psm_and_spm_layouts_rearrange_the_document(seed):
    ids, labels = _document(seed)
    psm_ids, psm_labels = apply_fim(ids, labels, TOKENS, fim_rate=1.0, spm_rate=0.0)
    prefix, middle, suffix = _pieces(psm_ids, psm_labels, spm=False)
    assert prefix + middle + suffix == ids and len(psm_ids) == len(ids) + 3
    spm_ids, spm_labels = apply_fim(ids, labels, TOKENS, fim_rate=1.0, spm_rate=1.0)
    _, prefix_and_middle, spm_suffix = _pieces(spm_ids, spm_labels, spm=True)
    assert spm_suffix == suffix and prefix_and_middle == prefix + middle  # same cut points for the same document


def test_rate_zero_changes_nothing_and_draws_are_deterministic_per_document():
    documents = [_document(seed) for seed in range(200)]
    assert all(apply_fim(ids, labels, TOKENS, fim_rate=0.0) == (ids, labels) for ids, labels in documents)
    half = [apply_fim(ids, labels, TOKENS, fim_rate=0.5) for ids, labels in documents]
    rearranged = sum(TOKENS[FIM_PREFIX] in ids for ids, _ in half)
    assert 70 <= rearranged <= 130
    assert half == [apply_fim(ids, labels, TOKENS, fim_rate=0.5) for ids, labels in documents]
    other_seed = [apply_fim(ids, labels, TOKENS, fim_rate=0.5, seed=1) for ids, labels in documents]
    assert other_seed != half


def test_add_fim_tokens_grows_tokenizer_and_embeddings_once():
    tokenizer = reso_hf.create_default_tokenizer()
    with pytest.raises(ValueError, match="the tokenizer has no FIM tokens"):
        fim_token_ids(tokenizer)
    before = len(tokenizer)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=before, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    token_ids = add_fim_tokens(tokenizer, model)
    assert len(tokenizer) == before + 3 and sorted(token_ids.values()) == [before, before + 1, before + 2]
    assert model.get_input_embeddings().weight.shape[0] == before + 3
    assert add_fim_tokens(tokenizer, model) == token_ids and len(tokenizer) == before + 3
    # a sentinel is one token, never split
    prompt = fill_in_middle("def f(x):\n    return ", "\n", tokenizer=tokenizer)
    encoded = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encoded[0] == token_ids[FIM_PREFIX] and encoded[-1] == token_ids[FIM_MIDDLE]


def test_fill_in_middle_prompts():
    assert fill_in_middle("a", "c") == "<fim_prefix>a<fim_suffix>c<fim_middle>"
    assert fill_in_middle("a", "c", format="spm") == "<fim_prefix><fim_suffix>c<fim_middle>a"
    with pytest.raises(ValueError, match=r"format must be one of \['psm', 'spm'\], got 'mps'"):
        fill_in_middle("a", "c", format="mps")


@pytest.mark.parametrize("field", ["fim_rate", "fim_spm_rate"])
def test_rates_outside_zero_one_are_refused(field):
    with pytest.raises(ValueError, match=f"{field} must be a number in \\[0, 1\\], got 1.5"):
        DataArguments(use_bundled_sample=True, **{field: 1.5})


def test_build_datasets_applies_fim_to_every_document_at_rate_one():
    tokenizer = reso_hf.create_default_tokenizer()
    with pytest.raises(ValueError, match="call reso_hf.training.fim.add_fim_tokens"):
        build_datasets(DataArguments(use_bundled_sample=True, block_size=2048, packing=False, fim_rate=1.0), tokenizer)
    token_ids = add_fim_tokens(tokenizer)
    plain, _, _ = build_datasets(DataArguments(use_bundled_sample=True, block_size=2048, packing=False), tokenizer)
    fim, _, _ = build_datasets(
        DataArguments(use_bundled_sample=True, block_size=2048, packing=False, fim_rate=1.0), tokenizer)
    assert len(fim) == len(plain)
    for before, after in zip(plain["input_ids"], fim["input_ids"]):
        assert all(after.count(token) == 1 for token in token_ids.values())
        assert sorted(t for t in after if t not in token_ids.values()) == sorted(before)
