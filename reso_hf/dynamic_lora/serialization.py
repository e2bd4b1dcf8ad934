"""Atomic, pickle-free writing of JSON and safetensors files.

Every file is first written to a temporary file in the same directory and then moved into place with
`os.replace`, so a crash never leaves a half-written state next to a valid one. The file then gets the mode
a plain `open()` would have given it under the process umask: `mkstemp` creates its file 0600, and so does
safetensors >= 0.8 (it writes through a private temporary file of its own, safetensors issue #782).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def umask_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask: 0o666 without the umask's bits."""
    umask = os.umask(0o077)  # the only way to read the umask is to set it; restore it at once
    os.umask(umask)
    return 0o666 & ~umask


def apply_umask_mode(path: str) -> None:
    """Give `path` the mode a plain `open()` would have given it (see the module docstring)."""
    os.chmod(path, umask_file_mode())


def apply_umask_mode_to_safetensors(directory: str) -> None:
    """`apply_umask_mode` on every `*.safetensors` file directly in `directory`: the files that
    `save_pretrained` (transformers, PEFT) writes with safetensors come out 0600 otherwise."""
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors") and os.path.isfile(path):
            apply_umask_mode(path)


def _temporary_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(handle)
    apply_umask_mode(temporary)
    return temporary


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str, payload: bytes) -> None:
    temporary = _temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(payload)
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
        apply_umask_mode(temporary)  # safetensors replaced our temporary file by its own 0600 one
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)
