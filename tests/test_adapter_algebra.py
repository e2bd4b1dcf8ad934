"""Algebra over adapters (reso_hf.adapter_algebra) on tiny random Llama models, for PEFT LoRA and DynamicLoRA."""

import math
import os
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dynamic_lora"))
from dynamic_lora_helpers import batch, small_config, tiny_llama  # noqa: E402

from reso_hf import adapter_algebra as algebra  # noqa: E402

TARGETS = ["q_proj", "v_proj", "o_proj"]


def _randomise(model, adapter, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter}." in name or name.endswith(f".{adapter}.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _model(kind, names=("first", "second"), seed=0):
    """A tiny Llama with adapters `names`, random (non-zero) factors."""
    base = tiny_llama(seed)
    if kind == "lora":
        def config():
            return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        def config():
            return small_config(target_modules=TARGETS, tiers=["domain", "context"])
    model = get_peft_model(base, config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    for index, name in enumerate(names):
        _randomise(model, name, seed=100 + index)
    return model.eval()


def _delta_close(first, second, atol=1e-5):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=1e-4)


KINDS = ["lora", "dynamic_lora"]


@pytest.mark.parametrize("kind", KINDS)
def test_union_then_difference_recovers_the_first_adapter(kind):
    model = _model(kind)
    algebra.union(model, ["first", "second"], "sum", weights=[1.0, 0.5])
    expected = {n: d_a + 0.5 * d_b for (n, d_a), d_b in zip(algebra.delta_weights(model, "first").items(),
                                                            algebra.delta_weights(model, "second").values())}
    _delta_close(algebra.delta_weights(model, "sum"), expected)
    algebra.union(model, ["second"], "half_b", weights=[0.5])
    algebra.difference(model, "sum", "half_b", "back")
    _delta_close(algebra.delta_weights(model, "back"), algebra.delta_weights(model, "first"))


@pytest.mark.parametrize("kind", KINDS)
def test_negate_twice_is_the_identity_and_negation_cancels(kind):
    model = _model(kind)
    algebra.negate(model, "first", "not_a")
    algebra.negate(model, "not_a", "not_not_a")
    delta_a = algebra.delta_weights(model, "first")
    _delta_close(algebra.delta_weights(model, "not_a"), {n: -d for n, d in delta_a.items()})
    _delta_close(algebra.delta_weights(model, "not_not_a"), delta_a)
    # a + (-a) changes nothing: the model with it active equals the base model
    algebra.union(model, ["first", "not_a"], "zero")
    model.set_adapter("zero")
    ids = batch()
    with torch.no_grad():
        with_zero = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(with_zero, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_interpolate_ends_and_midpoint(kind):
    model = _model(kind)
    for t, name in [(0.0, "t0"), (1.0, "t1"), (0.25, "t25")]:
        algebra.interpolate(model, "first", "second", t, name)
    delta_a, delta_b = algebra.delta_weights(model, "first"), algebra.delta_weights(model, "second")
    _delta_close(algebra.delta_weights(model, "t0"), delta_a)
    _delta_close(algebra.delta_weights(model, "t1"), delta_b)
    _delta_close(algebra.delta_weights(model, "t25"), {n: 0.75 * delta_a[n] + 0.25 * delta_b[n] for n in delta_a})


@pytest.mark.parametrize("kind", KINDS)
def test_similarity_of_an_adapter_with_itself_and_its_negation(kind):
    model = _model(kind)
    same = algebra.similarity(model, "first", "first")
    assert same["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert same["subspace_overlap"] == pytest.approx(1.0, abs=1e-5)
    assert max(max(angles) for angles in same["principal_angles"].values()) < 0.1  # degrees (float32 arccos near 1)
    algebra.negate(model, "first", "not_a")
    assert algebra.similarity(model, "first", "not_a")["cosine"] == pytest.approx(-1.0, abs=1e-6)
    # independent random adapters: nearly orthogonal deltas in 32-dim modules, partial subspace overlap
    other = algebra.similarity(model, "first", "second")
    assert abs(other["cosine"]) < 0.3
    assert 0.0 < other["subspace_overlap"] < 0.9


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["output", "input", "both"])
def test_projected_difference_is_orthogonal_to_the_removed_adapter(kind, side):
    model = _model(kind)
    algebra.difference(model, "first", "second", "a_without_b", mode="project", side=side)
    assert abs(algebra.similarity(model, "a_without_b", "second")["cosine"]) < 1e-5
    # projecting out an adapter's own subspace leaves nothing
    algebra.difference(model, "first", "first", "empty", mode="project", side=side)
    assert all(d.abs().max() < 1e-4 for d in algebra.delta_weights(model, "empty").values())


@pytest.mark.parametrize("kind", KINDS)
def test_intersection_keeps_agreeing_entries_and_reports_truncation(kind):
    model = _model(kind)
    # an adapter and a copy of it: TIES with density 1 gives the adapter back (every sign agrees, mean of equals)
    algebra.union(model, ["first"], "a_copy")
    report = algebra.intersection(model, ["first", "a_copy"], "a_and_a", density=1.0)
    _delta_close(algebra.delta_weights(model, "a_and_a"), algebra.delta_weights(model, "first"), atol=1e-4)
    assert report["relative_truncation_error"] == pytest.approx(0.0, abs=1e-4)
    # opposite adapters: the elected sign keeps one side only, so the result is not zero (unlike the union)
    algebra.negate(model, "first", "not_a")
    algebra.intersection(model, ["first", "not_a"], "conflict", density=0.5, rank=2)
    assert max(d.abs().max() for d in algebra.delta_weights(model, "conflict").values()) > 0
    sparse = algebra.intersection(model, ["first", "second"], "ties", density=0.3, rank=1)
    assert 0.0 < sparse["relative_truncation_error"] < 1.0


def test_cluster_groups_adapters_by_direction():
    model = _model("lora", names=("first", "second", "third"))
    algebra.union(model, ["first", "third"], "a_like", weights=[1.0, 0.1])  # mostly a
    algebra.union(model, ["second", "third"], "b_like", weights=[1.0, 0.1])  # mostly b
    result = algebra.cluster(model, ["first", "second", "a_like", "b_like"], threshold=0.5)
    labels = result["labels"]
    assert labels["first"] == labels["a_like"] != labels["second"] == labels["b_like"]
    assert algebra.cluster(model, ["first", "second", "a_like", "b_like"], n_clusters=1)["labels"] == {
        "first": 0, "second": 0, "a_like": 0, "b_like": 0}


@pytest.mark.parametrize("kind", KINDS)
def test_results_export_to_plain_lora_exactly_or_truncated(kind, tmp_path):
    model = _model(kind)
    algebra.union(model, ["first", "second"], "sum", weights=[1.0, -0.5])
    model.set_adapter("sum")
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    exact = algebra.save_as_lora(model, "sum", tmp_path / "exact")
    assert exact["relative_truncation_error"] == pytest.approx(0.0, abs=1e-5)
    reloaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "exact")).eval()
    assert reloaded.peft_config["default"].peft_type.value == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    truncated = algebra.save_as_lora(model, "sum", tmp_path / "rank1", rank=1)
    assert truncated["rank"] == 1 and 0.0 < truncated["relative_truncation_error"] < 1.0
    # the reported error is the true one: compare the written factors with the exact deltas
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "rank1" / "adapter_model.safetensors"))
    deltas = algebra.delta_weights(model, "sum")
    lost = sum(float(((state[f"base_model.model.{n}.lora_B.weight"] @ state[f"base_model.model.{n}.lora_A.weight"]
                       - d) ** 2).sum()) for n, d in deltas.items())
    whole = sum(float((d ** 2).sum()) for d in deltas.values())
    assert truncated["relative_truncation_error"] == pytest.approx(math.sqrt(lost / whole), rel=1e-3)


def test_dynamic_lora_results_keep_tiers_and_save_as_dynamic_lora(tmp_path):
    model = _model("dynamic_lora")
    algebra.union(model, ["first", "second"], "sum")
    config = model.peft_config["sum"]
    assert config.tiers == ["domain", "context"]
    assert config.tier_ranks == {"domain": 8, "context": 4}  # "cat": the inputs' ranks added per tier
    model.save_pretrained(str(tmp_path), selected_adapters=["sum"])
    reloaded = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "sum"), adapter_name="sum")
    _delta_close(algebra.delta_weights(reloaded, "sum"), algebra.delta_weights(model, "sum"))


@pytest.mark.parametrize("call, message", [
    (lambda m: algebra.union(m, ["first", "missing"], "x"), "adapter 'missing' does not exist"),
    (lambda m: algebra.union(m, ["first"], "second"), "adapter_name 'second' is already taken"),
    (lambda m: algebra.union(m, ["first", "second"], "x", weights=[1.0]), "one weight per adapter"),
    (lambda m: algebra.interpolate(m, "first", "second", 0.5, "t0.5"), "adapter_name must not contain '.'"),
    (lambda m: algebra.interpolate(m, "first", "second", float("nan"), "x"), "t must be a finite number"),
    (lambda m: algebra.difference(m, "first", "second", "x", mode="xor"), "mode must be one of ['subtract', 'project']"),
    (lambda m: algebra.difference(m, "first", "second", "x", mode="project", side="up"), "side must be one of"),
    (lambda m: algebra.intersection(m, ["first", "second"], "x", density=0.0), "density must be in (0, 1]"),
    (lambda m: algebra.intersection(m, ["first"], "x"), "at least two adapters"),
    (lambda m: algebra.cluster(m, ["first", "second"], n_clusters=3), "n_clusters must be None or an int in [1, 2]"),
])
def test_bad_arguments_are_refused_with_the_allowed_values(call, message):
    model = _model("lora")
    before = sorted(model.peft_config)
    with pytest.raises(ValueError) as error:
        call(model)
    assert message in str(error.value)
    assert sorted(model.peft_config) == before


def test_lora_union_is_exact_with_rslora():
    # PEFT's own LoRA "cat" assumes the new adapter's scaling alpha / r = 1; with use_rslora it is sqrt(r)
    def config():
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True, task_type="CAUSAL_LM")

    model = get_peft_model(tiny_llama(0), config(), adapter_name="first")
    model.add_adapter("second", config())
    for index, name in enumerate(["first", "second"]):
        _randomise(model, name, seed=100 + index)
    algebra.union(model, ["first", "second"], "sum", weights=[1.0, -2.0])
    algebra.negate(model, "first", "not_first")
    first, second = algebra.delta_weights(model, "first"), algebra.delta_weights(model, "second")
    _delta_close(algebra.delta_weights(model, "sum"), {n: first[n] - 2.0 * second[n] for n in first})
    _delta_close(algebra.delta_weights(model, "not_first"), {n: -d for n, d in first.items()})
