"""Group-structured attention (issue 15): masks, per-head primes, cache consistency, causality, config, learned
selection, and the block-sparse flex path against the dense one."""

import json

import pytest
import torch
import transformers.integrations.flex_attention as transformers_flex
from hypothesis import given, settings
from hypothesis import strategies as st
from reso_test_models import micro_config
from torch.nn.attention.flex_attention import flex_attention
from transformers import DynamicCache

import reso_hf
from reso_hf.modeling.group_attention import (
    GroupAttentionMask,
    attended_fraction,
    create_group_attention_mask,
    group_attention_reference,
)


def group_model(primes="auto", local_window=2, learned=False, attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    config = micro_config(group_attention=dict(enabled=True, primes=primes, local_window=local_window,
                                               learned_selection=learned), **overrides)
    config._attn_implementation = attn
    model = reso_hf.ResoLLMForCausalLM(config).eval()
    with torch.no_grad():  # non-zero selection logits, so the mixture is not uniform
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "group_selection"):
                layer.self_attn.group_selection.logits.normal_(0, 1.0)
    return model


def twin(model, attn):
    """The same weights under another attention implementation."""
    config = model.config.__class__(**model.config.to_dict())
    config._attn_implementation = attn
    other = reso_hf.ResoLLMForCausalLM(config).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """Flex attention without torch.compile: the same mask semantics, no 10 s compile in a unit test."""

    def run(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(transformers_flex, "compile_friendly_flex_attention", run)


@pytest.mark.parametrize("primes", [[2, 3, 5, 7], [3, 3, 2, 5], [7, 2, 2, 11]])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mask_matches_hand_built_reference(primes, attn):
    model = group_model(primes=primes, local_window=3, attn=attn)
    length = 13
    embeds = torch.zeros(2, length, model.config.hidden_size)
    mask = create_group_attention_mask(model.config, embeds, None, None, torch.arange(length)[None])
    (dense,) = [p.mask for p in mask.passes]
    allowed = dense if dense.dtype == torch.bool else dense == 0
    expected = group_attention_reference(primes, 3, length)
    assert allowed.shape == (2, 4, length, length)
    assert torch.equal(allowed[0], expected) and torch.equal(allowed[1], expected)
    # Spot checks of the definition itself: head 0 with prime p sees i - p*k and the window only.
    p = primes[0]
    visible = sorted({j for j in range(13) if (12 - j) % p == 0 or 12 - j < 3})
    assert expected[0, 12].nonzero().flatten().tolist() == visible


def test_attended_fraction_counts_reference_pairs():
    primes, window, length = [2, 3, 5, 7], 4, 40
    reference = group_attention_reference(primes, window, length)
    causal = length * (length + 1) / 2
    assert attended_fraction(primes, window, length) == pytest.approx(float(reference.sum()) / (4 * causal))


def test_disabled_passes_transformers_causal_mask_and_adds_nothing():
    torch.manual_seed(0)
    config = micro_config()
    assert config.group_attention.enabled is False
    model = reso_hf.ResoLLMForCausalLM(config).eval()
    assert not any("group_selection" in name for name in model.state_dict())
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True)
    ids = torch.randint(3, 97, (1, 9))
    model(ids)
    hook.remove()
    assert seen == [None]  # sdpa without padding: transformers' is_causal fast path, exactly as before


def test_full_window_equals_dense_attention():
    """With a window covering the sequence the pattern is plain causal: same logits as group_attention off."""
    dense = twin(group_model(), "sdpa")
    dense.config.group_attention.enabled = False
    ids = torch.randint(3, 97, (2, 11))
    wide = group_model(local_window=64)
    wide.load_state_dict(dense.state_dict())
    torch.testing.assert_close(wide(ids).logits, dense(ids).logits, rtol=0, atol=2e-6)
    narrow = group_model(local_window=1)
    narrow.load_state_dict(dense.state_dict())
    assert (narrow(ids).logits - dense(ids).logits).abs().max() > 1e-3  # the mask really restricts attention


@settings(max_examples=12, deadline=None)
@given(
    primes=st.lists(st.sampled_from([2, 3, 5, 7]), min_size=4, max_size=4),
    window=st.integers(1, 4),
    learned=st.booleans(),
    attn=st.sampled_from(["sdpa", "eager"]),
    prompt=st.integers(1, 6),
    steps=st.integers(1, 6),
)
def test_cached_decode_equals_uncached_forward(primes, window, learned, attn, prompt, steps):
    model = group_model(primes=primes, local_window=window, learned=learned, attn=attn)
    ids = torch.randint(3, 97, (2, prompt + steps), generator=torch.Generator().manual_seed(prompt * 7 + steps))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        pieces = [model(ids[:, :prompt], past_key_values=cache, use_cache=True).logits]
        for t in range(prompt, prompt + steps):
            pieces.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    primes=st.lists(st.sampled_from([2, 3, 5, 7, 11]), min_size=4, max_size=4),
    window=st.integers(1, 5),
    learned=st.booleans(),
    cut=st.integers(1, 12),
)
def test_future_tokens_never_change_past_logits(primes, window, learned, cut):
    model = group_model(primes=primes, local_window=window, learned=learned)
    generator = torch.Generator().manual_seed(cut)
    ids = torch.randint(3, 97, (1, 14), generator=generator)
    changed = ids.clone()
    changed[:, cut:] = torch.randint(3, 97, (1, 14 - cut), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[:, :cut], model(changed).logits[:, :cut], rtol=0, atol=1e-6)


def test_generate_matches_uncached_greedy():
    model = group_model(primes=[2, 3, 3, 5], local_window=2)
    prompt = torch.randint(3, 97, (1, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model(sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(out.sequences if hasattr(out, "sequences") else out, sequence)


@pytest.mark.parametrize("learned", [False, True])
def test_flex_block_sparse_path_equals_dense(uncompiled_flex, learned):
    dense = group_model(primes=[2, 3, 7, 2], local_window=2, learned=learned, attn="eager",
                        max_position_embeddings=512)
    flex = twin(dense, "flex_attention")
    length, prompt = 400, 390  # long enough for the residue order to win on the prime-7 head
    ids = torch.randint(3, 97, (2, length))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :4] = 0  # left padding
    mask = create_group_attention_mask(flex.config, torch.zeros(2, length, 32), attention_mask.bool(), None, None)
    assert any(not torch.equal(order, torch.arange(length)) for p in mask.passes for order in p.query_order)
    with torch.no_grad():
        expected = dense(ids, attention_mask=attention_mask).logits
        got = flex(ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1, 4:], expected[1, 4:], rtol=1e-5, atol=1e-5)
        cache = DynamicCache(config=flex.config)
        steps = [flex(ids[:1, :prompt], past_key_values=cache, use_cache=True).logits]
        steps += [flex(ids[:1, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(prompt, length)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[:1], rtol=1e-5, atol=1e-5)


def test_flex_packed_documents_equal_dense(uncompiled_flex):
    dense = group_model(primes=[2, 3, 5, 2], local_window=2, attn="eager")
    flex = twin(dense, "flex_attention")
    ids = torch.randint(3, 97, (1, 20))
    position_ids = torch.cat([torch.arange(8), torch.arange(12)])[None]  # two packed documents
    with torch.no_grad():
        # Without a cache: transformers detects packing only then.
        expected = dense(ids, position_ids=position_ids, use_cache=False).logits
        got = flex(ids, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        alone = dense(ids[:, 8:], use_cache=False).logits  # the second document sees nothing of the first
    torch.testing.assert_close(expected[:, 8:], alone, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_skips_tiles_in_residue_order():
    """In residue-class order the subgroup part is block-diagonal: tiles of the causal triangle drop out. Each head
    keeps the cheaper order, so none computes more tiles than causal attention."""
    config = micro_config(group_attention=dict(enabled=True, primes=[2, 3, 7, 2], local_window=4),
                          max_position_embeddings=4096)
    config._attn_implementation = "flex_attention"
    length = 2048
    mask = create_group_attention_mask(config, torch.zeros(1, length, config.hidden_size), None, None, None)
    block_mask = mask.passes[0].mask
    causal_tiles = (length // 128) * (length // 128 + 1) // 2
    computed = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks)[0].sum(-1).tolist()
    assert computed[0] == computed[3] and max(computed) < causal_tiles and computed[0] < 0.8 * causal_tiles
    short = create_group_attention_mask(config, torch.zeros(1, 256, config.hidden_size), None, None, None).passes[0]
    assert all(torch.equal(order, torch.arange(256)) for order in short.query_order)  # natural order kept when cheaper
    dense = block_mask.to_dense()[0]  # (heads, q tiles, kv tiles), sanity of the merged block mask
    assert dense.shape == (4, length // 128, length // 128)


def test_learned_selection_gradients_flow_and_sharp_logits_select_a_prime():
    model = group_model(primes=[2, 3, 5, 7], learned=True).train()
    ids = torch.randint(3, 97, (2, 12))
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        grad = layer.self_attn.group_selection.logits.grad
        assert grad is not None and grad.abs().sum() > 0
    # Logits that put all weight on prime 3 for every head reproduce the fixed model with primes [3, 3, 3, 3].
    fixed = group_model(primes=[3, 3, 3, 3])
    learned = group_model(primes=[2, 3, 5, 7], learned=True)
    state = {k: v for k, v in learned.state_dict().items() if "group_selection" not in k}
    fixed.load_state_dict(state)
    with torch.no_grad():
        for layer in learned.model.layers:
            layer.self_attn.group_selection.logits.copy_(torch.tensor([[-1e4, 1e4, -1e4, -1e4]] * 4))
        torch.testing.assert_close(learned(ids).logits, fixed(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "group_attention, message",
    [
        (dict(enabled="yes"), "group_attention.enabled='yes' is invalid: expected a bool"),
        (dict(primes="all"), "group_attention.primes='all' is invalid: expected 'auto' or a non-empty list of primes"),
        (dict(primes=[2, 4, 5, 7]), "group_attention.primes=[2, 4, 5, 7] is invalid: expected 'auto' or a non-empty"),
        (dict(primes=[2, 3]), "group_attention.primes=[2, 3] is invalid: expected 'auto' or one prime per attention "
                              "head (4 of them)"),
        (dict(local_window=0), "group_attention.local_window=0 is invalid: expected an int >= 1"),
        (dict(learned_selection=1), "group_attention.learned_selection=1 is invalid: expected a bool"),
        (dict(window=3), "group_attention has unknown fields ['window']; allowed: ['enabled', 'learned_selection', "
                         "'local_window', 'primes']"),
    ],
)
def test_config_validation_names_field_and_allowed_values(group_attention, message):
    with pytest.raises(ValueError) as error:
        micro_config(group_attention=group_attention)
    assert message in str(error.value)


def test_unsupported_attention_implementation_is_refused():
    model = group_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"group_attention.enabled needs attn_implementation in \('eager', 'sdpa', "
                                         r"'flex_attention'\), got 'flash_attention_2'"):
        create_group_attention_mask(model.config, torch.zeros(1, 4, 32), None, None, None)


def test_config_and_learned_logits_round_trip(tmp_path):
    model = group_model(primes=[2, 3, 3, 5], local_window=3, learned=True)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["group_attention"]
    assert saved == {"enabled": True, "primes": [2, 3, 3, 5], "local_window": 3, "learned_selection": True}
    loaded = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert loaded.config.group_attention == model.config.group_attention
    ids = torch.randint(3, 97, (1, 10))
    assert torch.equal(loaded.model.layers[1].self_attn.group_selection.logits,
                       model.model.layers[1].self_attn.group_selection.logits)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert json.loads((tmp_path / "config.json").read_text())["group_attention"] == saved


def test_group_mask_object_reaches_every_layer():
    model = group_model()
    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(type(kwargs["attention_mask"])), with_kwargs=True)
        for layer in model.model.layers]
    model(torch.randint(3, 97, (1, 6)))
    for hook in hooks:
        hook.remove()
    assert seen == [GroupAttentionMask] * model.config.num_hidden_layers
