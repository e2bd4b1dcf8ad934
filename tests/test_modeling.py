"""ResoLLM network: causality, cache consistency, switches, resonance math, numerics (SPEC §3.1–§3.4)."""

import math

import pytest
import torch
from reso_test_models import ALL_SWITCHES, micro_config, micro_model, switch_id
from hypothesis import given, settings
from hypothesis import strategies as st

import reso_hf
from reso_hf.modeling.modeling_reso_llm import ResoLLMAttention
from reso_hf.modeling.primes import first_primes
from reso_hf.modeling.resonance import (
    GOLDEN_RATIO,
    ResoLLMCoherenceGate,
    ResoLLMKuramoto,
    ResoLLMPrimeCode,
    prime_phasor,
    rotary_inverse_frequencies,
)

SWITCH_PARAMS = [pytest.param(s, id=switch_id(s)) for s in ALL_SWITCHES]
VOCAB = 97


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


# ------------------------------------------------------------------------------------------------
# Causality and cache consistency, for every combination of the core switches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switches", SWITCH_PARAMS)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_future_tokens_do_not_change_past_logits(switches, data):
    model = micro_model(**switches)
    length = data.draw(st.integers(2, 20), label="length")
    prefix = data.draw(st.integers(1, length - 1), label="prefix")
    ids = data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=length, max_size=length), label="ids")
    tail = data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=length - prefix, max_size=length - prefix))
    original = torch.tensor([ids])
    changed = torch.tensor([ids[:prefix] + tail])
    assert torch.allclose(_logits(model, original)[:, :prefix], _logits(model, changed)[:, :prefix], atol=1e-5)


@pytest.mark.parametrize("switches", SWITCH_PARAMS)
def test_incremental_decoding_logits_equal_full_recomputation(switches):
    model = micro_model(**switches)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 14))
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 14):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    assert torch.allclose(incremental, full, atol=2e-5), (incremental - full).abs().max()


def test_cache_is_taken_under_either_name_and_grows_in_place():
    # transformers 5.24's generate() passes the cache as `cache=`: a forward that ignored it rebuilt the cache at
    # every step and decoded each new token without its context
    model = micro_model(kuramoto=True)
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 9))
    full = _logits(model, ids)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values
        steps = []
        for t in range(6, 9):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            assert out.past_key_values is cache and cache.get_seq_length() == t + 1
            steps.append(out.logits)
        with pytest.raises(ValueError, match="two different KV caches"):
            model(ids[:, 8:9], cache=cache, past_key_values=model(ids[:, :1], use_cache=True).past_key_values)
    assert torch.allclose(torch.cat(steps, dim=1), full[:, 6:], atol=2e-5)


@pytest.mark.parametrize("switches", SWITCH_PARAMS)
def test_greedy_generation_with_cache_equals_recomputation(switches):
    model = micro_model(**switches)
    prompt = torch.tensor([[5, 17, 33, 41, 8, 60]])
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    recomputed = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, recomputed)
    # Recompute the whole greedy chain by hand: each token is the argmax of a full forward pass.
    sequence = prompt
    for _ in range(12):
        next_token = _logits(model, sequence)[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(cached, sequence)


@pytest.mark.parametrize("kuramoto", [True, False], ids=["kuramoto", "no_kuramoto"])
def test_beam_search_with_cache_equals_recomputation(kuramoto):
    model = micro_model(kuramoto=kuramoto)
    prompt = torch.tensor([[5, 17, 33, 41], [9, 9, 70, 3]])
    kwargs = dict(max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("switches", SWITCH_PARAMS)
def test_left_padded_batch_matches_unpadded_rows(switches):
    model = micro_model(**switches)
    short, long = [40, 12, 7], [5, 17, 33, 41, 8, 60, 22]
    pad = len(long) - len(short)
    batch = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    batched = model.generate(batch, attention_mask=mask, use_cache=True, **kwargs)
    batched_no_cache = model.generate(batch, attention_mask=mask, use_cache=False, **kwargs)
    alone_short = model.generate(torch.tensor([short]), use_cache=True, **kwargs)
    alone_long = model.generate(torch.tensor([long]), use_cache=True, **kwargs)
    assert torch.equal(batched, batched_no_cache)
    assert batched[0, -8:].tolist() == alone_short[0, -8:].tolist()
    assert batched[1, -8:].tolist() == alone_long[0, -8:].tolist()


# ------------------------------------------------------------------------------------------------
# Switches: off means no parameters and no computation
# ------------------------------------------------------------------------------------------------

COMPONENT_OF_SWITCH = {
    "prime_embedding": (ResoLLMPrimeCode, "model.embed_tokens.prime_code."),
    "kuramoto": (ResoLLMKuramoto, ".self_attn.kuramoto."),
    "coherence_gating": (ResoLLMCoherenceGate, ".coherence_gate."),
}


@pytest.mark.parametrize("switch", sorted(COMPONENT_OF_SWITCH))
def test_switched_off_component_has_no_parameters_and_never_runs(switch):
    component, key_fragment = COMPONENT_OF_SWITCH[switch]
    on = reso_hf.ResoLLMForCausalLM(micro_config(**{switch: True}))
    off = reso_hf.ResoLLMForCausalLM(micro_config(**{switch: False}))
    on_keys, off_keys = set(on.state_dict()), set(off.state_dict())
    added = on_keys - off_keys
    assert added and all(key_fragment in key for key in added)
    assert not any(key_fragment in key for key in off_keys)
    assert off_keys < on_keys

    calls = {"on": 0, "off": 0}
    for name, model in (("on", on), ("off", off)):
        for module in model.modules():
            if isinstance(module, component):
                module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        with torch.no_grad():
            model(torch.tensor([[4, 5, 6]]))
    assert calls["on"] > 0 and calls["off"] == 0


def test_cache_has_one_layer_per_decoder_layer_and_kuramoto_keeps_its_sums_in_it():
    for kuramoto in (False, True):
        model = micro_model(kuramoto=kuramoto)
        with torch.no_grad():
            cache = model(torch.tensor([[4, 5, 6]]), use_cache=True).past_key_values
        assert len(cache) == len(cache.layers) == model.config.num_hidden_layers
        phase_sums = [getattr(layer, "phase_sums", None) for layer in cache.layers]
        if kuramoto:
            # (B, H_kv, T, [sum cos, sum sin, count]): the count of real tokens runs 1, 2, 3.
            assert all(s.shape == (1, 2, 3, 3) for s in phase_sums)
            assert torch.equal(phase_sums[0][0, 0, :, 2], torch.tensor([1.0, 2.0, 3.0]))
        else:
            assert phase_sums == [None, None]


# ------------------------------------------------------------------------------------------------
# The resonance math
# ------------------------------------------------------------------------------------------------

PRIMES = first_primes(5000)


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 4999), b=st.integers(0, 4999), frequencies=st.integers(1, 64))
def test_phasor_of_prime_product_is_product_of_phasors(a, b, frequencies):
    p_a, p_b = PRIMES[a], PRIMES[b]
    product = prime_phasor(torch.tensor(p_a * p_b), frequencies)
    separate = prime_phasor(torch.tensor(p_a), frequencies) * prime_phasor(torch.tensor(p_b), frequencies)
    assert torch.allclose(product, separate, atol=1e-9)
    assert torch.allclose(product.abs(), torch.ones(frequencies, dtype=torch.float64))


def test_prime_code_table_rows_are_the_token_primes_phasors():
    module = ResoLLMPrimeCode(vocab_size=50, code_dim=8, hidden_size=4)
    token = 17
    phasor = prime_phasor(torch.tensor(PRIMES[token]), 4)
    expected = torch.cat([phasor.real, phasor.imag]).float()
    assert PRIMES[token] == 61
    assert torch.allclose(module.code_table[token], expected)
    assert module.code_table.shape == (50, 8)


def test_embedding_adds_projected_prime_code():
    model = micro_model(prime_embedding=True)
    ids = torch.tensor([[3, 4, 5]])
    token_embedding = model.model.embed_tokens.weight[ids]
    expected = token_embedding + model.model.prime_code.proj(model.model.prime_code.code_table[ids])
    captured = {}
    handle = model.model.layers[0].register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    assert torch.allclose(captured["x"], expected)


def test_rotary_spectra():
    golden = rotary_inverse_frequencies("golden", 6, 16, 10000.0)
    ratios = golden[:-1] / golden[1:]
    assert torch.allclose(ratios, torch.full_like(ratios, GOLDEN_RATIO))
    assert golden[0] == 1.0
    geometric = rotary_inverse_frequencies("geometric", 8, 16, 10000.0)
    assert torch.allclose(geometric, 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16)))
    with pytest.raises(ValueError, match="rope_spectrum"):
        rotary_inverse_frequencies("fibonacci", 4, 8, 10000.0)


def test_kuramoto_step_matches_its_definition_and_chunking():
    torch.manual_seed(3)
    module = ResoLLMKuramoto(hidden_size=8, num_key_value_heads=2, coupling_init=0.7)
    module.phase_proj.weight.data.normal_(0, 2.0)
    hidden = torch.randn(1, 9, 8)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])  # two padding tokens on the left
    cos_c, sin_c, order, sums = module(hidden, mask, None, None)

    theta = (hidden @ module.phase_proj.weight.T).transpose(1, 2)[0].double()  # (H, T)
    for t in range(2, 9):
        z = torch.exp(1j * theta[:, 2 : t + 1]).mean(dim=1)  # padding excluded
        expected = theta[:, t] + 0.7 * z.abs() * torch.sin(z.angle() - theta[:, t])
        assert torch.allclose(cos_c[0, :, t].double(), expected.cos(), atol=1e-5)
        assert torch.allclose(sin_c[0, :, t].double(), expected.sin(), atol=1e-5)
        assert torch.allclose(order[0, :, t].double(), z.abs(), atol=1e-5)

    first = module(hidden[:, :4], mask[:, :4], None, None)
    rest = module(hidden[:, 4:], mask[:, 4:], first[3][:, :, -1:], None)
    assert torch.allclose(torch.cat([first[0], rest[0]], dim=2), cos_c, atol=1e-6)
    assert torch.allclose(torch.cat([first[3], rest[3]], dim=2), sums, atol=1e-6)
    assert torch.equal(sums[0, 0, :, 2], torch.tensor([0.0, 0, 1, 2, 3, 4, 5, 6, 7]))  # padding is not counted


def test_coherence_gate_spans_the_full_range():
    gate = ResoLLMCoherenceGate(hidden_size=4, threshold=1 / GOLDEN_RATIO, sharpness=12.0)
    with torch.no_grad():
        gate.score.weight.fill_(1.0)
        gate.score.bias.zero_()
    _, closed = gate(torch.full((1, 1, 4), -5.0))
    _, opened = gate(torch.full((1, 1, 4), 5.0))
    assert closed.item() < 0.01 and opened.item() > 0.97
    u = torch.randn(2, 3, 4)
    gated, g = gate(u)
    c = torch.sigmoid(u @ gate.score.weight.T + gate.score.bias)
    assert torch.allclose(g, torch.sigmoid(12.0 * (c - 1 / GOLDEN_RATIO)).squeeze(-1))
    assert torch.allclose(gated, u * g.unsqueeze(-1))


# ------------------------------------------------------------------------------------------------
# Numerics and outputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("switches", SWITCH_PARAMS)
def test_sdpa_and_eager_agree(switches):
    sdpa = micro_model(**switches)
    eager = micro_model(attn_implementation="eager", **switches)
    ids = torch.randint(3, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        difference = (_logits(sdpa, ids, **kwargs) - _logits(eager, ids, **kwargs)).abs()
        # Padding positions attend to nothing; their outputs are undefined and never used.
        assert difference[mask.bool()].max() <= 1e-5


def test_hidden_states_attentions_gates_and_coherence_are_real_tensors():
    model = micro_model(attn_implementation="eager")
    ids = torch.tensor([[4, 9, 16, 25, 36, 49]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True, output_gates=True,
                    output_coherence=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (1, 6, 32) for h in out.hidden_states)
    assert not torch.allclose(out.hidden_states[0], out.hidden_states[1])
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 6, 6)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 4, 6), atol=1e-5)
    assert torch.all(out.attentions[0].triu(diagonal=1) == 0)  # causal
    assert len(out.gates) == 2 and out.gates[0].shape == (1, 6)
    assert torch.all((out.gates[0] > 0) & (out.gates[0] < 1)) and out.gates[0].std() > 0
    assert len(out.coherence) == 2 and out.coherence[0].shape == (1, 2, 6)
    assert torch.allclose(out.coherence[0][..., 0], torch.ones(1, 2))  # one token: perfectly coherent
    assert torch.all(out.coherence[0] <= 1 + 1e-6)


def test_out_of_vocabulary_ids_raise_naming_the_id():
    model = micro_model()
    with pytest.raises(ValueError, match=r"token id 97, outside the vocabulary \[0, 96\]"):
        model(torch.tensor([[3, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = micro_config()
    reference = reso_hf.ResoLLMForCausalLM(config)
    checkpointed = reso_hf.ResoLLMForCausalLM(config)
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert checkpointed.model.gradient_checkpointing
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    for model in (reference, checkpointed):
        model.train()
        model(ids, labels=ids).loss.backward()
    for (name, p_ref), (_, p_ckpt) in zip(reference.named_parameters(), checkpointed.named_parameters()):
        assert p_ref.grad is not None, name
        assert torch.allclose(p_ref.grad, p_ckpt.grad, atol=1e-6), name
    # The prime-code projection starts at zero (no fixed noise on the embedding) and still learns.
    assert torch.count_nonzero(reference.model.prime_code.proj.weight) == 0
    trained_parts = ("kuramoto.coupling", "kuramoto.phase_proj", "coherence_gate.score", "prime_code.proj")
    for part in trained_parts:
        grads = [p.grad for n, p in reference.named_parameters() if part in n]
        assert grads and all(g.abs().sum() > 0 for g in grads), part


def test_bfloat16_loads_and_runs(tmp_path):
    model = micro_model()
    model.save_pretrained(tmp_path)
    loaded = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    ids = torch.tensor([[4, 9, 16, 25, 36, 49]])
    with torch.no_grad():
        logits = loaded(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - _logits(model, ids)).abs().max() < 0.1
    generated = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10)


def test_sampling_is_reproducible_and_cache_independent():
    model = micro_model()
    prompt = torch.tensor([[5, 17, 33]])
    runs = []
    for use_cache in (True, True, False):
        torch.manual_seed(123)
        runs.append(model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, use_cache=use_cache,
                                   pad_token_id=0))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_attention_module_supports_gqa_grouping():
    attention = ResoLLMAttention(micro_config(), layer_idx=0)
    assert attention.num_key_value_groups == 2 and attention.is_causal


def test_tiny_preset_has_about_five_million_parameters():
    model = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config())
    count = sum(p.numel() for p in model.parameters())
    assert 4_000_000 < count < 6_000_000, count
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert math.isclose(model.config.coherence_threshold, 1 / GOLDEN_RATIO)


@pytest.mark.parametrize("switches", SWITCH_PARAMS)
def test_packed_documents_do_not_see_each_other(switches):
    """Position-id resets mark packed documents: attention and the Kuramoto mean field both restart."""
    model = micro_model(**switches)
    first, second, third = [5, 17, 33, 41, 8], [60, 22, 9, 9, 70, 3, 12], [44, 45]
    packed = torch.tensor([first + second + third])
    position_ids = torch.tensor([list(range(5)) + list(range(7)) + list(range(2))])
    with torch.no_grad():
        # As for any transformers model, packing is recognised only without a cache (training setting).
        packed_logits = model(packed, position_ids=position_ids, use_cache=False).logits[0]
    offset = 0
    for document in (first, second, third):
        alone = _logits(model, torch.tensor([document]))[0]
        assert torch.allclose(packed_logits[offset : offset + len(document)], alone, atol=1e-5)
        offset += len(document)
