"""What PEFT's common tests expect of every additive tuner (issue 18): the shared safe_merge error,
LoRA conversion, mixed-adapter batches and add_weighted_adapter."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from dynamic_lora_helpers import batch, small_config, tiny_gpt2, tiny_llama


def _randomise_factors(model, seed: int = 0, scale: float = 0.2) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "dynamic_lora_" in name or "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _merge_error(model) -> str:
    with pytest.raises(ValueError) as error:
        model.base_model.merge_adapter(safe_merge=True)
    return str(error.value)


def test_safe_merge_of_a_broken_adapter_raises_peft_s_shared_message_and_changes_nothing():
    model = get_peft_model(tiny_llama(), small_config())
    layer = next(iter(model.base_model.adapter_layers().values()))
    with torch.no_grad():
        layer.dynamic_lora_B["default"]["context"][0, 0] = float("nan")
    weight_before = layer.get_base_layer().weight.detach().clone()
    message = _merge_error(model)
    assert message == "NaNs detected in the merged weights. The adapter default seems to be broken"
    torch.testing.assert_close(layer.get_base_layer().weight, weight_before, rtol=0, atol=0)
    assert not layer.merged

    # the very same text as PEFT's LoRA for the same fault
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        lora.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = float("inf")
    assert _merge_error(lora) == message


# ----- LoRA conversion -----------------------------------------------------------------------------------


# modules with both sides >= the total rank (20), so that a LoRA of that rank holds the adapter exactly
@pytest.mark.parametrize("builder, targets", [(tiny_llama, ["q_proj", "o_proj"]), (tiny_gpt2, ["c_attn", "c_proj"])])
def test_convert_to_lora_reproduces_the_adapter(builder, targets, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora.conversion import convert_to_lora, save_as_lora

    model = get_peft_model(builder(), small_config(target_modules=targets))
    _randomise_factors(model)
    assert model.base_model.supports_lora_conversion()
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    total_rank = model.peft_config["default"].total_rank
    lora_config, state_dict = convert_to_lora(model, rank=total_rank)
    assert lora_config.r == lora_config.lora_alpha == total_rank
    assert len(state_dict) == 2 * len(model.base_model.adapter_layers())
    save_as_lora(tmp_path, model, rank=total_rank)
    lora = PeftModel.from_pretrained(builder(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


# ----- mixed-adapter batches -----------------------------------------------------------------------------


def _two_adapters(builder=tiny_llama, targets=("q_proj", "v_proj")):
    model = get_peft_model(builder(), small_config(target_modules=list(targets)), adapter_name="first")
    # the second adapter has another tier layout and adapts only some of the modules
    model.add_adapter("second", small_config(target_modules=[targets[0]], tiers=["domain", "context"]))
    _randomise_factors(model, seed=1)
    return model.eval()


@pytest.mark.parametrize("builder, targets", [(tiny_llama, ("q_proj", "v_proj")), (tiny_gpt2, ("c_attn", "c_proj"))])
def test_mixed_adapter_batch_gives_every_row_its_own_adapter(builder, targets):
    model = _two_adapters(builder, targets)
    ids = batch(size=4)
    names = ["second", "__base__", "first", "second"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        single = {}
        for name in ("first", "second"):
            model.set_adapter(name)
            single[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            single["__base__"] = model(input_ids=ids).logits
    assert (single["first"] - single["second"]).abs().max() > 1e-3  # the rows really differ
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], single[name][row], rtol=1e-5, atol=1e-6)


def test_mixed_adapter_batch_in_generate_matches_single_adapter_generation():
    model = _two_adapters()
    prompt = batch(size=2, length=5)
    names = ["first", "second"]
    for options in ({}, {"num_beams": 3, "num_return_sequences": 2}):  # inputs expanded 3x, 2 returned per row
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, **options)
        with torch.no_grad():
            mixed = model.generate(input_ids=prompt, adapter_names=names, **settings)
            copies = options.get("num_return_sequences", 1)
            for row, name in enumerate(names):
                model.set_adapter(name)
                alone = model.generate(input_ids=prompt[row:row + 1], **settings)
                torch.testing.assert_close(mixed[row * copies:(row + 1) * copies], alone, rtol=0, atol=0)


def test_mixed_adapter_batch_errors_are_clear():
    model = _two_adapters()
    ids = batch(size=2)
    with pytest.raises(ValueError, match=r"unknown adapters \['typo'\]; allowed: \['first', 'second', '__base__'\]"):
        model(input_ids=ids, adapter_names=["first", "typo"])
    with pytest.raises(ValueError, match="must name one adapter .* per row of the batch: got 3 names for 2 rows"):
        model(input_ids=ids, adapter_names=["first", "second", "first"])
    with pytest.raises(TypeError, match="adapter_names must be a list of adapter names"):
        model(input_ids=ids, adapter_names="first")
    model.train()
    with pytest.raises(ValueError, match=r"at inference only: call model.eval\(\) first"):
        model(input_ids=ids, adapter_names=["first", "second"])
    model.eval()
    model.base_model.merge_adapter(["first"])
    with pytest.raises(ValueError, match=r"adapters \['first'\] are merged .* call unmerge_adapter\(\) first"):
        model(input_ids=ids, adapter_names=["first", "second"])


# ----- add_weighted_adapter ------------------------------------------------------------------------------


def _combination_inputs():
    """'first': all five tiers on q_proj and v_proj; 'second': domain (private) + context on q_proj only."""
    model = get_peft_model(tiny_llama(), small_config(), adapter_name="first")
    model.add_adapter("second", small_config(target_modules=["q_proj"], tiers=["domain", "context"],
                                             tier_ranks={"domain": 3, "context": 1}, tier_privacy={"domain": "private"}))
    _randomise_factors(model, seed=2)
    return model.eval()


def _tier_sum(layer, tier, adapters, weights):
    parts = [w * layer.tier_delta_weight(a, tier) for a, w in zip(adapters, weights)
             if a in layer.dynamic_lora_A and tier in layer.tier_names[a]]
    return sum(parts) if parts else torch.zeros(layer.out_features, layer.in_features)


def _weighted_sum(layer, adapters, weights):
    return sum(w * layer.get_delta_weight(a) for a, w in zip(adapters, weights) if a in layer.dynamic_lora_A)


def test_cat_combination_is_exact_tier_by_tier_and_keeps_the_strictest_privacy():
    model = _combination_inputs()
    adapters, weights = ["first", "second"], [0.7, -1.3]
    model.base_model.add_weighted_adapter(adapters, weights, "both", combination_type="cat")
    config = model.peft_config["both"]
    assert config.tiers == ["foundation", "domain", "swarm", "agent", "context"]
    assert config.tier_layout() == [{"name": "foundation", "rank": 8}, {"name": "domain", "rank": 4 + 3},
                                    {"name": "swarm", "rank": 4}, {"name": "agent", "rank": 2},
                                    {"name": "context", "rank": 2 + 1}]
    assert config.privacy_of("domain") == "private" and config.privacy_of("context") == "public"
    layers = model.base_model.adapter_layers("both")
    assert len(layers) == len(model.base_model.adapter_layers("first")) == 4
    with torch.no_grad():
        for layer in layers.values():
            for tier in config.tiers:
                torch.testing.assert_close(layer.tier_delta_weight("both", tier),
                                           _tier_sum(layer, tier, adapters, weights), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer.get_delta_weight("both"), _weighted_sum(layer, adapters, weights),
                                       rtol=1e-5, atol=1e-6)


def test_svd_combination_is_the_truncated_svd_of_each_tier_sum():
    model = _combination_inputs()
    adapters, weights = ["first", "second"], [1.0, 0.5]
    tuner = model.base_model
    tuner.add_weighted_adapter(adapters, weights, "svd_default")  # svd by default, like PEFT
    tuner.add_weighted_adapter(adapters, weights, "svd_exact", combination_type="svd",
                               svd_rank={"domain": 7, "context": 3})
    default = model.peft_config["svd_default"]
    # default rank per tier: the largest input rank of that tier
    assert [default.rank_of(t) for t in default.tiers] == [8, 4, 4, 2, 2]
    with torch.no_grad():
        for layer in tuner.adapter_layers("svd_default").values():
            for tier in default.tiers:
                target = _tier_sum(layer, tier, adapters, weights)
                singular = torch.linalg.svdvals(target)
                tail = singular[default.rank_of(tier):].square().sum().sqrt()
                error = (layer.tier_delta_weight("svd_default", tier) - target).norm()
                # the truncation error of a rank-k SVD is the norm of the dropped singular values
                torch.testing.assert_close(error, tail, rtol=1e-3, atol=1e-5)
            # with enough rank per tier (the sum of the inputs' ranks) the combination is exact
            torch.testing.assert_close(layer.get_delta_weight("svd_exact"), _weighted_sum(layer, adapters, weights),
                                       rtol=1e-4, atol=1e-5)
    # truncation did drop something on q_proj, where two adapters share the domain and context tiers
    q_proj = tuner.adapter_layers("svd_default")["model.layers.0.self_attn.q_proj"]
    assert (q_proj.get_delta_weight("svd_default") - _weighted_sum(q_proj, adapters, weights)).norm() > 1e-3


def test_linear_combination_follows_peft_s_factorwise_rule():
    model = _combination_inputs()
    model.add_adapter("third", small_config())
    _randomise_factors(model, seed=3)
    tuner = model.base_model
    tuner.add_weighted_adapter(["first"], [-0.5], "scaled", combination_type="linear")
    tuner.add_weighted_adapter(["first", "third"], [0.6, 0.4], "mix", combination_type="linear")
    with torch.no_grad():
        for layer in tuner.adapter_layers("scaled").values():
            # one adapter: exact
            torch.testing.assert_close(layer.get_delta_weight("scaled"), -0.5 * layer.get_delta_weight("first"),
                                       rtol=1e-5, atol=1e-6)
            for tier in layer.tier_names["mix"]:
                s = layer.tier_scalings
                c1, c2 = 0.6 * s["first"][tier] / s["mix"][tier], 0.4 * s["third"][tier] / s["mix"][tier]
                a = c1 ** 0.5 * layer.dynamic_lora_A["first"][tier] + c2 ** 0.5 * layer.dynamic_lora_A["third"][tier]
                b = c1 ** 0.5 * layer.dynamic_lora_B["first"][tier] + c2 ** 0.5 * layer.dynamic_lora_B["third"][tier]
                torch.testing.assert_close(layer.dynamic_lora_A["mix"][tier], a, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(layer.dynamic_lora_B["mix"][tier], b, rtol=1e-5, atol=1e-6)


def test_combined_adapter_saves_and_loads_as_a_dynamic_lora_adapter(tmp_path):
    from peft import PeftModel

    model = _combination_inputs()
    model.base_model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "both", combination_type="cat")
    model.set_adapter("both")
    ids = batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, selected_adapters=["both"])
    # the combined domain tier holds the private input's domain tier, so a plain save leaves it out
    saved = load_file(str(tmp_path / "both" / "adapter_model.safetensors"))
    assert saved and not any(key.endswith(".domain") for key in saved)
    assert any(key.endswith(".context") for key in saved)
    model.base_model.save_pretrained(tmp_path / "full", include_private=True, adapter_name="both")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "full").eval()
    assert loaded.peft_config["default"].tier_layout() == model.peft_config["both"].tier_layout()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(combination_type="ties"), r"combination_type must be one of \['svd', 'cat', 'linear'\] for DynamicLoRA, "
                                        r"got 'ties'"),
        (dict(adapters=["first", "nope"]), r"adapters \['nope'\] do not exist; allowed: \['first', 'second'\]"),
        (dict(weights=[1.0]), "weights must hold one weight per adapter: 1 weights for 2 adapters"),
        (dict(weights=[1.0, float("nan")]), "weights must be finite numbers"),
        (dict(adapter_name="first"), "adapter_name 'first' is already taken"),
        (dict(combination_type="linear"), "combination_type='linear' averages the factors, so every adapter needs the "
                                          "same tiers and ranks"),
        (dict(combination_type="cat", svd_rank=4), "svd_rank applies to combination_type='svd' only"),
        (dict(svd_rank={"swarm": 2, "bogus": 1}), r"svd_rank has tiers \['bogus'\] that no combined adapter holds"),
        (dict(svd_rank=0), "svd_rank must give every tier a positive integer rank"),
    ],
)
def test_add_weighted_adapter_rejects_bad_arguments_and_adds_nothing(kwargs, message):
    model = _combination_inputs()
    arguments = dict(adapters=["first", "second"], weights=[1.0, 1.0], adapter_name="new")
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        model.base_model.add_weighted_adapter(**arguments)
    assert sorted(model.peft_config) == ["first", "second"]
