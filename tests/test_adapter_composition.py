"""Composites with runtime weights (reso_hf.adapter_composition) on tiny random Llama models."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_adapter_algebra import _model  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dynamic_lora"))
from dynamic_lora_helpers import VOCAB, batch, tiny_llama  # noqa: E402

from reso_hf import adapter_algebra as algebra  # noqa: E402
from reso_hf.adapter_composition import AdapterComposite, AdapterRouter  # noqa: E402

KINDS = ["lora", "dynamic_lora"]


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _alone(model, name, ids):
    """Logits with adapter `name` alone, as PEFT computes them (call before a composite changes the scalings)."""
    model.base_model.set_adapter(name)
    return _logits(model, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_runtime_weights_equal_the_weighted_union_without_merging(kind):
    model = _model(kind)
    ids = batch()
    algebra.union(model, ["first", "second"], "mix", weights=[1.0, 0.5])
    algebra.union(model, ["first", "second"], "mix2", weights=[-0.25, 2.0])
    expected, expected2, only_first = (_alone(model, "mix", ids), _alone(model, "mix2", ids),
                                       _alone(model, "first", ids))
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    composite = AdapterComposite(model, {"first": 1.0, "second": 0.5})
    torch.testing.assert_close(_logits(composite, ids), expected, atol=1e-5, rtol=1e-5)
    composite.set_weights({"first": -0.25, "second": 2.0})
    torch.testing.assert_close(_logits(composite, ids), expected2, atol=1e-5, rtol=1e-5)
    composite.disable("second")
    composite.set_weight("first", 1.0)
    torch.testing.assert_close(_logits(composite, ids), only_first, atol=1e-5, rtol=1e-5)
    assert composite.weights["second"] == 2.0  # kept while off
    torch.testing.assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_weight)


@pytest.mark.parametrize("kind", KINDS)
def test_layer_switch_equals_an_adapter_zeroed_outside_those_layers(kind):
    model = _model(kind)
    ids = batch()
    algebra.union(model, ["first"], "first_layer0_only")
    with torch.no_grad():
        for name, parts in algebra.adapter_parts(model, "first_layer0_only").items():
            if ".layers.1." in name:
                for part in parts:
                    factor_b, factor_a = part.factors()
                    part.write(torch.zeros_like(factor_b), factor_a)
    expected, whole = _alone(model, "first_layer0_only", ids), _alone(model, "first", ids)
    assert not torch.allclose(expected, whole, atol=1e-3)
    composite = AdapterComposite(model, {"first": 1.0})
    composite.set_layers("first", [0])
    torch.testing.assert_close(_logits(composite, ids), expected, atol=1e-5, rtol=1e-5)
    composite.set_layers("first", None)
    torch.testing.assert_close(_logits(composite, ids), whole, atol=1e-5, rtol=1e-5)


def test_dynamic_lora_tier_subset_and_tier_weights():
    model = _model("dynamic_lora")
    ids = batch()
    algebra.union(model, ["first"], "domain_only")
    with torch.no_grad():
        for parts in algebra.adapter_parts(model, "domain_only").values():
            for part in parts:
                if part.tier == "context":
                    factor_b, factor_a = part.factors()
                    part.write(0.0 * factor_b, factor_a)
    expected = _alone(model, "domain_only", ids)
    composite = AdapterComposite(model, {"first": 1.0})
    composite.use_tiers("first", ["domain"])
    torch.testing.assert_close(_logits(composite, ids), expected, atol=1e-5, rtol=1e-5)
    composite.set_tier_weights("first", {"domain": 1.0, "context": 1.0})
    torch.testing.assert_close(_logits(composite, ids), _alone(model, "first", ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"tiers \['swarm'\] are not tiers of adapter 'first'; allowed: \['domain', 'context'\]"):
        composite.set_tier_weights("first", {"swarm": 0.5})


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_as_one_folder(kind, tmp_path):
    model = _model(kind)
    ids = batch()
    composite = AdapterComposite(model, {"first": 0.7, "second": 0.3})
    composite.set_layers("second", [1])
    composite.set_schedule([{"first": 1.0, "second": 0.0}, {"first": 0.5, "second": 0.5}])
    composite.set_weights({"first": 0.7, "second": 0.3})
    if kind == "dynamic_lora":
        composite.set_tier_weights("first", {"context": 0.25})
    expected = _logits(composite, ids)
    composite.save_pretrained(str(tmp_path))
    manifest = json.loads((tmp_path / "composite.json").read_text())
    assert manifest["topology"] == "sequenced"
    assert [(a["name"], a["weight"], a["layers"]) for a in manifest["adapters"]] == [
        ("first", 0.7, None), ("second", 0.3, [1])]
    assert (tmp_path / "first" / "adapter_model.safetensors").exists()
    loaded = AdapterComposite.from_pretrained(tiny_llama(0), str(tmp_path))
    torch.testing.assert_close(_logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    assert loaded.at_turn(0) == {"first": 1.0, "second": 0.0}
    assert loaded.at_turn(7) == {"first": 0.5, "second": 0.5}  # later turns keep the last scheduled weights


def _token_prompts(low, high, count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, high, (6,), generator=generator) for _ in range(count)]


def test_router_sends_prompts_to_the_adapter_of_their_kind(tmp_path):
    model = _model("lora")
    # two "topics": tokens 0..19 and 60..79 share a direction each, as related tokens do in trained embeddings
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        directions = torch.linalg.qr(torch.randn(table.shape[1], 2, generator=torch.Generator().manual_seed(5)))[0].T
        table[0:20] += 0.2 * directions[0]
        table[60:80] += 0.2 * directions[1]
    first_like, second_like = _token_prompts(0, 20, 1, seed=3)[0], _token_prompts(60, 80, 1, seed=4)[0]
    ids = torch.stack([first_like, second_like])
    with_first, with_second = _alone(model, "first", ids), _alone(model, "second", ids)
    composite = AdapterComposite(model)
    router = AdapterRouter(composite, mode="top1")
    router.fit("first", _token_prompts(0, 20, 8, seed=1))
    router.fit("second", _token_prompts(60, 80, 8, seed=2))
    assert router.route(first_like[None]) == {"first": 1.0, "second": 0.0}
    # a mixed batch in one forward (PEFT adapter_names): each row equals its adapter alone
    routed = router.forward_routed(ids)
    torch.testing.assert_close(routed[0], with_first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed[1], with_second[1], atol=1e-5, rtol=1e-5)
    soft = AdapterRouter(AdapterComposite(model), mode="softmax", temperature=0.5)
    soft.centroids = dict(router.centroids)
    weights = soft.weights_for(ids)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2))
    assert weights[0, 0] > weights[0, 1] and weights[1, 1] > weights[1, 0]
    composite.save_pretrained(str(tmp_path))
    loaded = AdapterComposite.from_pretrained(tiny_llama(0), str(tmp_path))
    assert loaded.topology == "routed" and loaded.router.mode == "top1"
    torch.testing.assert_close(loaded.router.centroids["second"], router.centroids["second"])


@pytest.mark.parametrize("kind", KINDS)
def test_ensemble_mixes_the_members_distributions(kind):
    model = _model(kind)
    ids = batch()
    p_first = torch.softmax(_alone(model, "first", ids), dim=-1)
    p_second = torch.softmax(_alone(model, "second", ids), dim=-1)
    # with one member left the ensemble decodes as that adapter alone, greedily
    expected_generation = ids[:1, :4]
    for _ in range(3):
        next_token = _alone(model, "first", expected_generation)[:, -1].argmax(-1, keepdim=True)
        expected_generation = torch.cat([expected_generation, next_token], dim=1)
    composite = AdapterComposite(model, {"first": 3.0, "second": 1.0}, topology="ensemble")
    mixed = composite.ensemble_logprobs(ids)
    torch.testing.assert_close(mixed.exp(), 0.75 * p_first + 0.25 * p_second, atol=1e-6, rtol=1e-5)
    # the composite's own weights are back after the ensemble ran the members alone
    assert composite.weights == {"first": 3.0, "second": 1.0}
    composite.set_weight("second", 0.0)
    torch.testing.assert_close(composite.ensemble_logprobs(ids), torch.log(p_first), atol=1e-5, rtol=1e-5)
    generated = composite.ensemble_generate(ids[:1, :4], max_new_tokens=3)
    assert torch.equal(generated, expected_generation)


@pytest.mark.parametrize("call, message", [
    (lambda c: c.set_weight("missing", 1.0), "adapter 'missing' is not in the composite; adapters: ['first', 'second']"),
    (lambda c: c.set_weight("first", float("inf")), "weight must be a finite number"),
    (lambda c: c.set_topology("mesh"), "topology must be one of ['weighted', 'sequenced', 'routed', 'ensemble']"),
    (lambda c: c.set_layers("first", [-1]), "layers must be non-negative decoder layer indices"),
    (lambda c: c.set_tier_weights("first", {"domain": 0.5}), "tier weights apply to DYNAMIC_LORA adapters"),
    (lambda c: c.at_turn(0), "no schedule: call set_schedule first"),
    (lambda c: AdapterRouter(c, mode="vote"), "mode must be one of ['top1', 'softmax']"),
    (lambda c: AdapterRouter(c).weights_for(batch()), "the router has no centroids"),
])
def test_composite_refuses_bad_settings(call, message):
    composite = AdapterComposite(_model("lora"))
    with pytest.raises(ValueError) as error:
        call(composite)
    assert message in str(error.value)
