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
