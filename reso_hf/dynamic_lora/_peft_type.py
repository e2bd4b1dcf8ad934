"""Add DYNAMIC_LORA to PEFT's `PeftType` enum (the "enum extension route", see HF_NOTES).

`peft.utils.register_peft_method` only accepts names that are members of `PeftType`, and transformers'
`load_adapter` / `delete_adapter` look the type up in the enum too, so plain string keys in PEFT's mapping
tables are not enough. A member is added to the `(str, Enum)` class in place; repeated calls are no-ops.
"""

from __future__ import annotations

from peft.utils import PeftType

from ..enum_extension import add_enum_member

DYNAMIC_LORA_NAME = "DYNAMIC_LORA"


def ensure_dynamic_lora_peft_type() -> PeftType:
    return add_enum_member(PeftType, DYNAMIC_LORA_NAME, DYNAMIC_LORA_NAME)
