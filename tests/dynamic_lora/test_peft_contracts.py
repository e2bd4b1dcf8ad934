"""What PEFT's common tests expect of every additive tuner (issue 18): the shared safe_merge error,
LoRA conversion, mixed-adapter batches and add_weighted_adapter."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

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
    for options in ({}, {"num_beams": 2}, {"num_beams": 2, "num_return_sequences": 2}):
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
