"""Add DYNAMIC_LORA to PEFT's `PeftType` enum (the "enum extension route", see HF_NOTES).

`peft.utils.register_peft_method` only accepts names that are members of `PeftType`, and transformers'
`load_adapter` / `delete_adapter` look the type up in the enum too, so plain string keys in PEFT's mapping
tables are not enough. A member is added to the `(str, Enum)` class in place; repeated calls are no-ops.
"""

from __future__ import annotations

from peft.utils import PeftType

DYNAMIC_LORA_NAME = "DYNAMIC_LORA"


def ensure_dynamic_lora_peft_type() -> PeftType:
    existing = PeftType.__members__.get(DYNAMIC_LORA_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, DYNAMIC_LORA_NAME)
    member._name_ = DYNAMIC_LORA_NAME
    member._value_ = DYNAMIC_LORA_NAME
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__ skips EnumType's guard against (re)assigning members; the attribute must exist for
    # `PeftType.DYNAMIC_LORA`, the three tables for iteration, lookup by value and by name.
    type.__setattr__(PeftType, DYNAMIC_LORA_NAME, member)
    PeftType._member_map_[DYNAMIC_LORA_NAME] = member
    PeftType._value2member_map_[DYNAMIC_LORA_NAME] = member
    PeftType._member_names_.append(DYNAMIC_LORA_NAME)
    return member
