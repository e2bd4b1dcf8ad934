"""Register DynamicLoRA with PEFT: enum member, config class, tuner class and the `dynamic_lora_` prefix."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from ._peft_type import ensure_dynamic_lora_peft_type
from .config import DynamicLoraConfig
from .model import DynamicLoraModel
from .serialization import apply_umask_mode_to_safetensors


def register_dynamic_lora() -> None:
    """Make "dynamic_lora" a PEFT method; calling it again is a no-op (PEFT itself raises on repeats)."""
    if _weights_mode_save_hook not in DynamicLoraConfig._post_save_hooks:
        DynamicLoraConfig._post_save_hooks.append(_weights_mode_save_hook)
    peft_type = ensure_dynamic_lora_peft_type()
    registered = (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type),
        PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type),
        PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type),
    )
    if registered == (DynamicLoraConfig, DynamicLoraModel, DynamicLoraModel.prefix):
        return
    if any(entry is not None for entry in registered):
        raise RuntimeError(
            f"PEFT already has a different registration for {peft_type.value}: {registered}. Another package "
            "registered the same name."
        )
    register_peft_method(
        name="dynamic_lora", config_cls=DynamicLoraConfig, model_cls=DynamicLoraModel, prefix=DynamicLoraModel.prefix
    )


def _weights_mode_save_hook(config, save_directory, tuner, adapter_name) -> None:
    """PEFT saves the adapter weights before the config: give them the umask's mode like the other files
    (safetensors >= 0.8 writes them 0600)."""
    apply_umask_mode_to_safetensors(str(save_directory))
