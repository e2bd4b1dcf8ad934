"""Snapshots with provenance hashes (SPEC §5.8) and export to a plain PEFT LoRA adapter (SPEC §5.9)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from .serialization import atomic_save_safetensors, atomic_write_json

if TYPE_CHECKING:
    from .model import DynamicLoraModel

# Config fields that describe where/how an adapter is used rather than what it computes.
_VOLATILE_CONFIG_FIELDS = ("inference_mode", "runtime_config", "peft_version", "auto_mapping")


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def tensor_digest(tensor: torch.Tensor) -> str:
    """blake2b of dtype, shape and the raw bytes (little-endian CPU layout) of a tensor."""
    data = tensor.detach().to("cpu").contiguous()
    hasher = hashlib.blake2b(digest_size=32)
    hasher.update(str(data.dtype).encode())
    hasher.update(canonical_json(list(data.shape)).encode())
    hasher.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def hashable_config(config) -> dict:
    raw = config.to_dict()
    result = {}
    for key, value in raw.items():
        if key in _VOLATILE_CONFIG_FIELDS:
            continue
        if isinstance(value, set):
            value = sorted(value)
        if hasattr(value, "value"):  # enums
            value = value.value
        result[key] = value
    return result


def provenance_hash(config, tier_tensors: dict[str, torch.Tensor], excluded_tiers: set[str]) -> str:
    """blake2b over canonical JSON of the config and the digests of every tensor of the non-excluded tiers.

    `tier_tensors` keys are "<module>.<tier>.<A|B>"; the tier is the second-to-last component.
    """
    digests = {
        key: tensor_digest(tensor)
        for key, tensor in sorted(tier_tensors.items())
        if key.rsplit(".", 2)[-2] not in excluded_tiers
    }
    payload = canonical_json({"config": hashable_config(config), "tensors": digests})
    return hashlib.blake2b(payload.encode(), digest_size=32).hexdigest()


@dataclass(frozen=True)
class DynamicLoraSnapshot:
    """A frozen copy of an adapter's factors for inference, with its provenance hash.

    The tensors are private clones: training the live adapter afterwards does not change them. Apply them to
    a tuner with `DynamicLoraModel.restore_snapshot(snapshot)`.
    """

    adapter_name: str
    step: int
    provenance: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    config: dict = field(repr=False)


def export_lora(
    tuner: "DynamicLoraModel",
    save_directory: str,
    adapter_name: Optional[str] = None,
    tiers: Optional[list[str]] = None,
    include_private: bool = False,
) -> dict:
    """Write a standard PEFT LoRA adapter equivalent to the DynamicLoRA adapter.

    The LoRA rank is the sum of the exported tiers' ranks. A = [A_1; ...; A_T] and B = [s_1 B_1, ..., s_T B_T]
    (the tier scalings are folded into B), with lora_alpha = r so that LoRA's own scaling alpha / r is 1.
    Plain PEFT loads the folder without reso_hf. Returns a summary (rank, tiers, modules).
    """
    adapter_name = adapter_name or tuner.active_adapters[0]
    config = tuner.peft_config[adapter_name]
    selected = tuner.select_tiers(adapter_name, tiers, include_private)
    rank = sum(config.rank_of(t) for t in selected)
    layers = tuner.adapter_layers(adapter_name)
    state: dict[str, torch.Tensor] = {}
    uses_conv1d = False
    for name, layer in layers.items():
        uses_conv1d = uses_conv1d or layer.weight_is_transposed
        scalings = layer.tier_scalings[adapter_name]
        factor_a = torch.cat([layer.dynamic_lora_A[adapter_name][t].detach() for t in selected], dim=0)
        factor_b = torch.cat(
            [scalings[t] * layer.dynamic_lora_B[adapter_name][t].detach() for t in selected], dim=1
        )
        state[f"base_model.model.{name}.lora_A.weight"] = factor_a
        state[f"base_model.model.{name}.lora_B.weight"] = factor_b
    write_lora_folder(
        save_directory, state, rank=rank, target_modules=sorted(layers), fan_in_fan_out=uses_conv1d,
        task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
    )
    return {"rank": rank, "tiers": selected, "modules": len(layers), "directory": save_directory}


def write_lora_folder(
    save_directory: str,
    state: dict[str, torch.Tensor],
    rank: int,
    target_modules: list[str],
    fan_in_fan_out: bool = False,
    task_type: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    revision: Optional[str] = None,
) -> None:
    """Write a plain PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), atomically.

    `state` maps "base_model.model.<module>.lora_A.weight" / "...lora_B.weight" to factors that already hold the
    scaling (B carries it), so the config sets lora_alpha = r: LoRA's own scaling alpha / r is 1.
    """
    from peft import LoraConfig

    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        bias="none",
        target_modules=list(target_modules),
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        revision=revision,
        init_lora_weights=True,
    )
    os.makedirs(save_directory, exist_ok=True)
    atomic_save_safetensors(os.path.join(save_directory, "adapter_model.safetensors"), state)
    config_dict = lora_config.to_dict()
    for key, value in list(config_dict.items()):
        if isinstance(value, set):
            config_dict[key] = sorted(value)
        elif hasattr(value, "value"):
            config_dict[key] = value.value
    config_dict.pop("runtime_config", None)
    atomic_write_json(os.path.join(save_directory, "adapter_config.json"), config_dict)
