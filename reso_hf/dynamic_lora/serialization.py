"""Atomic, pickle-free writing of JSON and safetensors files.

Every file is first written to a temporary file in the same directory and then moved into place with
`os.replace`, so a crash never leaves a half-written state next to a valid one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _temporary_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(handle)
    return temporary


def atomic_write_text(path: str, text: str) -> None:
    temporary = _temporary_path(path)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def atomic_write_json(path: str, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True, allow_nan=False))


def atomic_save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses shared storage and non-contiguous views: store independent contiguous copies
    prepared = {name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()}
    temporary = _temporary_path(path)
    try:
        save_file(prepared, temporary, metadata=metadata or {"format": "pt"})
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)
