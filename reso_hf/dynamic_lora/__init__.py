"""DynamicLoRA: a hierarchy of LoRA tiers with inertia, phases, migration and resonance, as a PEFT tuner.

Importing this package registers the PEFT method "DYNAMIC_LORA" (idempotent).
"""

from .callback import DynamicLoraCallback, boundary_steps, find_dynamic_lora_tuner
from .config import KNOWN_TIERS, DynamicLoraConfig
from .export import DynamicLoraSnapshot, export_lora, provenance_hash
from .layer import DynamicLoraConv1D, DynamicLoraLayer, DynamicLoraLinear
from .migration import MigrationQueue, RollbackRing, migrate_pattern, subspace_autocorrelation, top_subspace
from .model import DynamicLoraModel
from .registration import register_dynamic_lora

register_dynamic_lora()

__all__ = [
    "KNOWN_TIERS",
    "DynamicLoraCallback",
    "DynamicLoraConfig",
    "DynamicLoraConv1D",
    "DynamicLoraLayer",
    "DynamicLoraLinear",
    "DynamicLoraModel",
    "DynamicLoraSnapshot",
    "MigrationQueue",
    "RollbackRing",
    "boundary_steps",
    "export_lora",
    "find_dynamic_lora_tuner",
    "migrate_pattern",
    "provenance_hash",
    "register_dynamic_lora",
    "subspace_autocorrelation",
    "top_subspace",
]
