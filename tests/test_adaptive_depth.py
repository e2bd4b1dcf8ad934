"""Adaptive depth (issue 15): entropy-based early exit per token, CALM state propagation, LayerSkip losses."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import reso_hf
from reso_hf.modeling.generation_reso_llm import entropy_of_scores
from reso_hf.modeling.modeling_reso_llm import early_exit_loss_weights
from reso_test_models import micro_config

NUM_LAYERS = 4
_BUILT = {}


def depth_model(kuramoto=True, dtype=torch.float64, **adaptive_depth):
    """A fresh 4-layer micro model (cached per arguments; tests must not mutate it). float64 by default, so that an
    exit decision is never flipped by the rounding difference between one-token and whole-sequence passes."""
    key = (kuramoto, dtype, tuple(sorted(adaptive_depth.items())))
    if key not in _BUILT:
        torch.manual_seed(0)
        config = micro_config(num_hidden_layers=NUM_LAYERS, kuramoto=kuramoto, adaptive_depth=adaptive_depth or None)
        model = reso_hf.ResoLLMForCausalLM(config).eval()
        with torch.no_grad():
            if model.model.prime_code is not None:
                model.model.prime_code.proj.weight.normal_(0, 0.1)
            for layer in model.model.layers:
                if layer.self_attn.kuramoto is not None:
                    layer.self_attn.kuramoto.phase_proj.weight.normal_(0, 1.0)
                # Larger weights than the init's: layers change the state, and the entropies of the exit
                # distributions differ by layer and token (so thresholds give mixed exit patterns).
                for weight in layer.parameters():
                    if weight.dim() == 2:
                        weight.mul_(10.0)
            model.model.embed_tokens.weight.mul_(10.0)
        _BUILT[key] = model.to(dtype)
    return _BUILT[key]


@torch.no_grad()
def layer_entropies(model, ids):
    """(L, B, T) entropies of every layer's exit distribution at full depth (no token exits)."""
    hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, layers 1..L-1, then the normed last
    states = [model.model.norm(h) for h in hidden[1:-1]] + [hidden[-1]]
    return torch.stack([entropy_of_scores(model.lm_head(state)) for state in states])


# ------------------------------------------------------------------------------------------------
# Off is today's model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kuramoto", [True, False], ids=["kuramoto", "no_kuramoto"])
def test_threshold_zero_and_disabled_give_bit_identical_logits(kuramoto):
    off = depth_model(kuramoto, torch.float32)
    on = depth_model(kuramoto, torch.float32, enabled=True, entropy_threshold=0.0)
    on.load_state_dict(off.state_dict())
    ids = torch.tensor([[5, 17, 33, 41, 8, 60, 22, 9]])
    reference = off(ids).logits
    assert off(ids).exit_layers is None
    assert torch.equal(off(ids, exit_entropy_threshold=0.0).logits, reference)
    assert torch.equal(on(ids).logits, reference)
    cached = off.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(off.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                    exit_entropy_threshold=0.0), cached)


# ------------------------------------------------------------------------------------------------
# Exits happen where the definition says
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_layers", [1, 2, 3])
def test_infinite_threshold_exits_every_token_at_min_layers(min_layers):
    model = depth_model(min_layers=min_layers)
    ids = torch.tensor([[5, 17, 33, 41, 8, 60], [9, 9, 70, 3, 44, 12]])
    out = model(ids, exit_entropy_threshold=math.inf)
    assert out.exit_layers.tolist() == [[min_layers] * 6] * 2
    # Every position computed exactly min_layers layers: its logits are those of a model cut after them.
    hidden = model(ids, output_hidden_states=True).hidden_states[min_layers]
    assert torch.allclose(out.logits, model.lm_head(model.model.norm(hidden)), atol=1e-12)
    full = model(ids, exit_entropy_threshold=0.0)
    assert full.exit_layers is None and not torch.allclose(full.logits, out.logits)


def test_first_token_exits_at_the_first_layer_below_the_threshold():
    # Position 0 sees only itself, so until it exits its states are the full-depth ones.
    model = depth_model(min_layers=1)
    ids = torch.tensor([[5, 17, 33, 41, 8, 60, 22, 9]])
    entropies = layer_entropies(model, ids)[:, 0, 0].tolist()  # (L,), computed in float32 as the model does
    for depth in range(1, NUM_LAYERS):
        threshold = entropies[depth - 1] + 1e-5
        expected = next(d for d in range(1, NUM_LAYERS) if entropies[d - 1] < threshold)
        assert model(ids, exit_entropy_threshold=threshold).exit_layers[0, 0].item() == expected
    below_all = min(entropies[:-1]) - 1e-5
    assert model(ids, exit_entropy_threshold=below_all).exit_layers[0, 0].item() == NUM_LAYERS


def test_generate_reports_layers_used_per_token():
    model = depth_model(min_layers=2)
    prompt = torch.tensor([[5, 17, 33, 41]])
    kwargs = dict(max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    assert model.generate(prompt, exit_entropy_threshold=math.inf, **kwargs).layers_used == [[2] * 7]
    assert model.generate(prompt, **kwargs).layers_used == [[NUM_LAYERS] * 7]
    mixed = model.generate(prompt, exit_entropy_threshold=_median_entropy(model, prompt), **kwargs)
    recomputed = model(mixed.sequences[:, :-1], exit_entropy_threshold=_median_entropy(model, prompt))
    assert mixed.layers_used == [recomputed.exit_layers[0, prompt.shape[1] - 1:].tolist()]


def test_coherence_trace_of_a_gate_only_model_averages_the_layers_that_ran():
    model = depth_model(kuramoto=False, min_layers=2)
    prompt = torch.tensor([[5, 17, 33, 41]])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    out = model.generate(prompt, exit_entropy_threshold=math.inf, **kwargs)
    assert out.layers_used == [[2] * 5] and len(out.coherence_trace[0]) == 5
    gates = model(out.sequences[:, :-1], exit_entropy_threshold=math.inf, output_gates=True).gates
    assert len(gates) == 2  # without a cache, nothing runs once every token has exited
    expected = torch.stack([g[0, prompt.shape[1] - 1:] for g in gates]).float().mean(0)
    assert out.coherence_trace[0] == pytest.approx(expected.tolist(), abs=1e-6)


def _median_entropy(model, ids) -> float:
    return float(layer_entropies(model, ids)[1:-1].median())


def test_decoding_an_exited_token_skips_attention_and_mlp_of_later_layers():
    model = depth_model(min_layers=2)
    calls = {}
    handles = []
    for index, layer in enumerate(model.model.layers):
        for name, module in (("mlp", layer.mlp), ("q_proj", layer.self_attn.q_proj),
                             ("k_proj", layer.self_attn.k_proj), ("v_proj", layer.self_attn.v_proj)):
            handles.append(module.register_forward_hook(
                lambda *_, key=(index, name): calls.__setitem__(key, calls.get(key, 0) + 1)))
    try:
        cache = DynamicCache(config=model.config)
        model(torch.tensor([[5, 17, 33]]), past_key_values=cache, use_cache=True, exit_entropy_threshold=math.inf)
        calls.clear()
        model(torch.tensor([[41]]), past_key_values=cache, use_cache=True, exit_entropy_threshold=math.inf)
    finally:
        for handle in handles:
            handle.remove()
    for index in range(NUM_LAYERS):
        ran = index < 2
        assert calls.get((index, "mlp"), 0) == int(ran) and calls.get((index, "q_proj"), 0) == int(ran)
        assert calls[(index, "k_proj")] == 1 and calls[(index, "v_proj")] == 1  # skipped layers still cache K/V
    assert cache.get_seq_length() == 4 and all(layer.keys.shape[2] == 4 for layer in cache.layers)


# ------------------------------------------------------------------------------------------------
# Cached and uncached decoding agree with early exit on
# ------------------------------------------------------------------------------------------------


def _threshold_between(entropies, quantile: float) -> float:
    """A threshold halfway between two consecutive distinct full-depth exit entropies (or below / above all of them),
    so that it does not sit on a token's entropy."""
    values = sorted(set(entropies.flatten().tolist()))
    edges = [values[0] - 1.0, *values, values[-1] + 1.0]
    index = min(int(quantile * (len(edges) - 1)), len(edges) - 2)
    return (edges[index] + edges[index + 1]) / 2


def _cached_vs_whole(model, prompt, split, threshold):
    ids = torch.tensor([prompt])
    whole = model(ids, exit_entropy_threshold=threshold)
    split = min(split, len(prompt) - 1)
    cache = DynamicCache(config=model.config)
    parts = [model(ids[:, :split], past_key_values=cache, use_cache=True, exit_entropy_threshold=threshold)]
    for t in range(split, len(prompt)):
        parts.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True, exit_entropy_threshold=threshold))
    layers = torch.cat([_exit_layers(p) for p in parts], dim=1)
    return layers, _exit_layers(whole), torch.cat([p.logits for p in parts], dim=1), whole.logits


@settings(max_examples=30, deadline=None)
@given(
    prompt=st.lists(st.integers(3, 96), min_size=2, max_size=10),
    split=st.integers(1, 9),
    quantile=st.floats(0.0, 1.0),
    infinite=st.booleans(),
    min_layers=st.integers(1, 3),
)
def test_cached_decoding_equals_the_whole_sequence_pass(prompt, split, quantile, infinite, min_layers):
    # Without Kuramoto a float64 model agrees to rounding (the exact statement); Kuramoto keeps its running phase sums
    # in float32 by design, which already separates cached and uncached logits by ~1e-5 at full depth: tested below.
    model = depth_model(False, min_layers=min_layers)
    threshold = math.inf if infinite else _threshold_between(layer_entropies(model, torch.tensor([prompt]))[:-1],
                                                             quantile)
    cached_layers, whole_layers, cached, whole = _cached_vs_whole(model, prompt, split, threshold)
    assert cached_layers.tolist() == whole_layers.tolist()
    assert torch.allclose(cached, whole, atol=1e-10, rtol=0)


@pytest.mark.parametrize("prompt,split,quantile", [
    ([5, 17, 33, 41, 8, 60, 22, 9, 70, 3], 4, 0.3), ([5, 17, 33, 41, 8, 60, 22, 9, 70, 3], 1, 0.6),
    ([3, 12, 50, 50, 7], 2, 0.25), ([90, 4, 4, 61, 28, 13, 77], 3, 0.3),
])
@pytest.mark.parametrize("min_layers", [1, 2])
def test_cached_decoding_with_kuramoto_agrees_up_to_its_float32_phase_sums(prompt, split, quantile, min_layers):
    model = depth_model(True, min_layers=min_layers)
    threshold = _threshold_between(layer_entropies(model, torch.tensor([prompt]))[:-1], quantile)
    cached_layers, whole_layers, cached, whole = _cached_vs_whole(model, prompt, split, threshold)
    assert cached_layers.tolist() == whole_layers.tolist()
    assert 0 < (whole_layers < NUM_LAYERS).sum() < len(prompt)  # a mixed pattern: some tokens exit, some do not
    assert torch.allclose(cached, whole, atol=1e-3, rtol=0)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                  exit_entropy_threshold=threshold)
    ids = torch.tensor([prompt])
    assert torch.equal(model.generate(ids, use_cache=True, **kwargs), model.generate(ids, use_cache=False, **kwargs))


def _exit_layers(output):
    if output.exit_layers is None:
        return torch.full(output.logits.shape[:2], NUM_LAYERS)
    return output.exit_layers


@settings(max_examples=10, deadline=None)
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=6), quantile=st.floats(0.0, 1.0))
def test_greedy_generation_with_cache_equals_recomputation_with_early_exit(prompt, quantile):
    model = depth_model(False, min_layers=1)
    ids = torch.tensor([prompt])
    threshold = _threshold_between(layer_entropies(model, ids)[:-1], quantile)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                  exit_entropy_threshold=threshold)
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


# ------------------------------------------------------------------------------------------------
# LayerSkip-style per-layer losses
# ------------------------------------------------------------------------------------------------


def test_loss_weights_follow_the_layerskip_and_uniform_formulas():
    # layerskip, L=4, min 2, scale 1: e = [0, 1*2*1/2, 1*3*2/2, 3 + 1*3*2/2] = [0, 1, 3, 6], over 10.
    assert early_exit_loss_weights(4, 2, 1.0, "layerskip") == pytest.approx([0.0, 0.1, 0.3, 0.6])
    assert early_exit_loss_weights(4, 1, 0.5, "uniform") == pytest.approx([0.2, 0.2, 0.2, 0.4])
    assert early_exit_loss_weights(4, 2, 0.0, "layerskip") == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("shape,scale,min_layers,weights", [
    ("layerskip", 1.0, 2, [0.0, 0.1, 0.3, 0.6]),
    ("uniform", 0.5, 1, [0.2, 0.2, 0.2, 0.4]),
])
def test_training_loss_is_the_weighted_sum_of_per_layer_losses(shape, scale, min_layers, weights):
    torch.manual_seed(0)
    config = micro_config(num_hidden_layers=NUM_LAYERS, adaptive_depth=dict(
        loss_scale=scale, loss_weights=shape, min_layers=min_layers))
    model = reso_hf.ResoLLMForCausalLM(config).train()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels)
    hidden = model(ids, output_hidden_states=True).hidden_states
    by_hand = []
    for depth in range(1, NUM_LAYERS + 1):
        state = model.model.norm(hidden[depth]) if depth < NUM_LAYERS else model.model(ids).last_hidden_state
        logits = model.lm_head(state)[:, :-1]
        targets = labels[:, 1:]
        by_hand.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100))
    expected = sum(w * loss for w, loss in zip(weights, by_hand))
    assert torch.allclose(out.loss, expected, atol=1e-6)
    active = [float(loss.detach()) if w > 0 else 0.0 for w, loss in zip(weights, by_hand)]
    assert out.layer_losses.tolist() == pytest.approx(active, abs=1e-6)
    assert out.hidden_states is None  # recorded for the loss only
    out.loss.backward()  # the early layers get a gradient through their own exit
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, labels=labels).layer_losses is None  # evaluation keeps the plain LM loss


def test_loss_scale_zero_is_the_plain_loss():
    torch.manual_seed(0)
    model = reso_hf.ResoLLMForCausalLM(micro_config(num_hidden_layers=NUM_LAYERS)).train()
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    assert out.layer_losses is None
    logits = model(ids).logits[:, :-1]
    assert torch.allclose(out.loss, F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1)), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Config and arguments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,message", [
    (dict(min_layers=0), "adaptive_depth.min_layers=0 is invalid: expected an int >= 1"),
    (dict(enabled=True, min_layers=4), r"adaptive_depth.min_layers=4 is invalid: expected an int in \[1, 3\]"),
    (dict(loss_scale=0.1, min_layers=5), r"adaptive_depth.min_layers=5 is invalid: expected an int in \[1, 3\]"),
    (dict(entropy_threshold=-1.0), r"adaptive_depth.entropy_threshold=-1.0 is invalid: expected a number in \[0.0"),
    (dict(loss_scale=float("nan")), "adaptive_depth.loss_scale=nan is invalid"),
    (dict(loss_weights="cubic"), r"adaptive_depth.loss_weights='cubic' is invalid: expected one of \('layerskip', "
                                 r"'uniform'\)"),
    (dict(enabled="yes"), r"adaptive_depth.enabled='yes' is invalid: expected a bool"),
    (dict(threshold=1.0), r"adaptive_depth has unknown fields \['threshold'\]; allowed: \['enabled', "
                          r"'entropy_threshold', 'loss_scale', 'loss_weights', 'min_layers'\]"),
])
def test_config_validation_names_the_field_and_the_allowed_values(fields, message):
    with pytest.raises(ValueError, match=message):
        micro_config(num_hidden_layers=NUM_LAYERS, adaptive_depth=fields)


def test_threshold_argument_validation():
    model = depth_model(min_layers=2)
    ids = torch.tensor([[5, 17, 33]])
    for bad in (-0.5, float("nan"), "high", True):
        with pytest.raises(ValueError, match="exit_entropy_threshold=.* is invalid: expected a number >= 0"):
            model(ids, exit_entropy_threshold=bad)
    with pytest.raises(ValueError, match="exit_entropy_threshold=-1 is invalid"):
        model.generate(ids, max_new_tokens=2, pad_token_id=0, exit_entropy_threshold=-1)
    with pytest.raises(ValueError, match="needs the LM head"):
        model.model(ids, exit_entropy_threshold=1.0)
    training = reso_hf.ResoLLMForCausalLM(micro_config(num_hidden_layers=NUM_LAYERS)).train()
    with pytest.raises(ValueError, match="evaluation mode only"):
        training(ids, exit_entropy_threshold=1.0)


def test_enabled_config_exits_by_default_only_in_evaluation():
    model = depth_model(enabled=True, min_layers=2, entropy_threshold=1e6)
    ids = torch.tensor([[5, 17, 33, 41]])
    assert model(ids).exit_layers.tolist() == [[2] * 4]
    assert model(ids, exit_entropy_threshold=0.0).exit_layers is None
    model.train()
    try:
        assert model(ids).exit_layers is None
    finally:
        model.eval()


def test_config_and_exits_survive_save_and_load(tmp_path):
    model = depth_model(enabled=True, min_layers=3, entropy_threshold=2.5, loss_scale=0.2, loss_weights="uniform")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["adaptive_depth"]
    assert saved == {"enabled": True, "min_layers": 3, "entropy_threshold": 2.5, "loss_scale": 0.2,
                     "loss_weights": "uniform"}
    loaded = reso_hf.ResoLLMForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded.config.adaptive_depth, reso_hf.AdaptiveDepthConfig)
    assert loaded.config.adaptive_depth == model.config.adaptive_depth
    ids = torch.tensor([[5, 17, 33, 41, 8]])
    for threshold in (None, math.inf):
        before, after = model(ids, exit_entropy_threshold=threshold), loaded(ids, exit_entropy_threshold=threshold)
        assert torch.equal(before.exit_layers, after.exit_layers)
        # Non-persistent buffers are recomputed at load (in float64 here, cast from float32 before): rounding only.
        assert torch.allclose(before.logits, after.logits, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# Training switches: `reso-hf train` config_overrides and `reso-hf sft --early_exit_loss_scale`
# ------------------------------------------------------------------------------------------------


def test_pretrain_config_overrides_switch_the_per_layer_losses_on():
    from reso_hf.training.arguments import PretrainArguments
    from reso_hf.training.pretrain import build_model

    tokenizer = reso_hf.create_default_tokenizer()
    overrides = json.dumps({"num_hidden_layers": 3, "adaptive_depth": {"loss_scale": 0.5, "min_layers": 1}})
    model = build_model(PretrainArguments(model_preset="tiny", config_overrides=overrides), tokenizer, 64)
    assert model.config.adaptive_depth.loss_scale == 0.5 and model.config.adaptive_depth.min_layers == 1
    ids = torch.randint(3, len(tokenizer), (1, 8))
    assert model.train()(ids, labels=ids).layer_losses.shape == (3,)


def test_sft_early_exit_loss_scale_sets_the_config_or_names_the_problem():
    from reso_hf.training.arguments import ArgumentError, SftArguments
    from reso_hf.training.sft import set_early_exit_loss_scale

    base = reso_hf.ResoLLMForCausalLM(micro_config(num_hidden_layers=NUM_LAYERS))
    set_early_exit_loss_scale(base, 0.3)
    assert base.config.adaptive_depth.loss_scale == 0.3 and base.config.adaptive_depth.min_layers == 2
    assert base.config.to_dict()["adaptive_depth"]["loss_scale"] == 0.3
    shallow = reso_hf.ResoLLMForCausalLM(micro_config(num_hidden_layers=2, adaptive_depth={"min_layers": 2}))
    with pytest.raises(ArgumentError, match="min_layers=2 leaves no layer to exit from in 2 layers"):
        set_early_exit_loss_scale(shallow, 0.3)
    llama = type("Llama", (), {"config": type("Config", (), {"model_type": "llama"})()})()
    with pytest.raises(ArgumentError, match="needs a ResoLLM base.*'llama'"):
        set_early_exit_loss_scale(llama, 0.3)
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ArgumentError, match="early_exit_loss_scale must be a finite number >= 0"):
            SftArguments(base_model="x", early_exit_loss_scale=bad)


@pytest.mark.parametrize("quantile", [0.1, 0.2, 0.3, 0.4, 0.5])
def test_early_exit_with_group_attention_keeps_cached_decoding_exact(quantile):
    """Both issue-15 switches at once: exited tokens' propagated keys/values go through the per-head prime masks."""
    torch.manual_seed(0)
    config = micro_config(num_hidden_layers=NUM_LAYERS, kuramoto=False, adaptive_depth={"min_layers": 1},
                          group_attention={"enabled": True, "local_window": 2})
    model = reso_hf.ResoLLMForCausalLM(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.mul_(10.0)
    model = model.to(torch.float64)
    prompt = [5, 17, 33, 41, 8, 60, 22, 9, 70, 3, 12, 50]
    threshold = _threshold_between(layer_entropies(model, torch.tensor([prompt]))[:-1], quantile)
    cached_layers, whole_layers, cached, whole = _cached_vs_whole(model, prompt, 3, threshold)
    assert cached_layers.tolist() == whole_layers.tolist()
    assert 1 < len(set(whole_layers.flatten().tolist()))  # a mixed exit pattern, not all or none
    assert torch.allclose(cached, whole, atol=1e-10, rtol=0)
