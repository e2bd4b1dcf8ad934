"""Add a member to a library's `(str, Enum)` in place (the "enum extension route", see HF_NOTES).

PEFT's `PeftType` and transformers' `SchedulerType` are closed enums that their libraries look names up in
(`PeftType(name)`, `SchedulerType(name)`, argparse choices built from the members); a new method or scheduler
becomes choosable everywhere those lookups happen only as a member. Repeated calls return the existing member.
"""

from __future__ import annotations

from enum import Enum


def add_enum_member(enum_class: type[Enum], name: str, value: str) -> Enum:
    existing = enum_class.__members__.get(name)
    if existing is not None:
        return existing
    member = str.__new__(enum_class, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_class
    member._sort_order_ = len(enum_class._member_names_)
    # type.__setattr__ skips EnumType's guard against (re)assigning members; the attribute must exist for
    # `EnumClass.NAME`, the three tables for iteration, lookup by value and by name.
    type.__setattr__(enum_class, name, member)
    enum_class._member_map_[name] = member
    enum_class._value2member_map_[value] = member
    enum_class._member_names_.append(name)
    return member
