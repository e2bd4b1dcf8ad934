"""Push a saved model or adapter folder to the Hub, uploading only what is meant to be public.

Every check happens before the first network call: the folder holds weights and a config, the repo id is
valid, the card renders (StrictUndefined template, validated metadata), and no file would leak a private
DynamicLoRA tier. The upload is `HfApi.create_repo` + `HfApi.upload_folder` with `allow_patterns` set to the
exact list of selected files (the same list `--dry-run` prints) and `ignore_patterns` set to every rule that
left a file out, so the two filters agree.

Left out (reason shown by the dry run):
- training state: optimizer / scheduler / scaler / RNG state, trainer_state.json, training_args.*,
  checkpoint-*/ and runs/ folders; the DynamicLoRA dynamics state (dynamic_lora_state.*) and audit log
  (dynamic_lora_audit.jsonl), and a ResoLLM's saved runtime memory (reso_state.*: goals, episodic memory,
  bindings; reso_memory.*: the indexed memory store; written only by `save_pretrained(save_memory=True)`) unless
  `include_training_state=True`;
- anything that is not safetensors/JSON/text (pickles: *.bin, *.pt, *.pth, *.pkl, *.ckpt);
- hidden files and folders, __pycache__, temporary files (*.tmp).
An adapter whose weights hold a tier marked private is refused unless `include_private=True`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..dynamic_lora.config import DYNAMICS_STATE_TENSORS_NAME, DYNAMICS_STATE_TIERS_METADATA
from .cards import CARD_NAME, _TIER_KEY, CardError, folder_kind, render_card, safetensors_shapes

# (pattern, reason); a pattern ending in "/" matches a folder at any depth.
TRAINING_STATE_PATTERNS = (
    ("optimizer*", "training state"), ("scheduler*", "training state"), ("scaler*", "training state"),
    ("rng_state*", "training state"), ("trainer_state.json", "training state"), ("training_args*", "training state"),
    ("checkpoint-*/", "training checkpoint"), ("runs/", "training logs"),
)
DYNAMICS_STATE_PATTERNS = (
    ("dynamic_lora_state.safetensors", "DynamicLoRA dynamics state"),
    ("dynamic_lora_state.json", "DynamicLoRA dynamics state"),
    ("dynamic_lora_audit.jsonl", "DynamicLoRA audit log"),
    ("reso_state.safetensors", "ResoLLM runtime memory (save_memory=True)"),
    ("reso_state.json", "ResoLLM runtime memory (save_memory=True)"),
    ("reso_memory.sqlite", "ResoLLM runtime memory (save_memory=True)"),
    ("reso_memory.faiss", "ResoLLM runtime memory (save_memory=True)"),
    ("reso_memory.faiss.json", "ResoLLM runtime memory (save_memory=True)"),
)
UNSAFE_PATTERNS = (
    ("*.bin", "pickle format"), ("*.pt", "pickle format"), ("*.pth", "pickle format"), ("*.pkl", "pickle format"),
    ("*.pickle", "pickle format"), ("*.ckpt", "pickle format"),
)
HOUSEKEEPING_PATTERNS = (("*.tmp", "temporary file"), ("__pycache__/", "cache"), (".*", "hidden"), (".*/", "hidden"))
_GLOB_CHARACTERS = re.compile(r"[*?\[\]]")


class PushError(ValueError):
    """The folder cannot be pushed as asked; raised before any network call."""


@dataclass
class PushPlan:
    folder: str
    repo_id: str
    private: bool
    kind: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, size in bytes)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    card: str = ""
    commit_url: Optional[str] = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self, dry_run: bool) -> str:
        verb = "would upload" if dry_run else "uploaded"
        visibility = "private" if self.private else "public"
        lines = [f"{'Dry run: ' if dry_run else ''}{verb} {len(self.files)} files ({_human(self.total_bytes)}) "
                 f"from {self.folder} to {self.repo_id} ({visibility} {self.kind} repo):"]
        width = max((len(path) for path, _ in self.files), default=0)
        lines += [f"  {path:<{width}}  {size:>12,} B" for path, size in self.files]
        if self.left_out:
            lines.append("Left out:")
            lines += [f"  {path}  ({reason})" for path, reason in self.left_out]
        if self.commit_url:
            lines.append(f"Commit: {self.commit_url}")
        return "\n".join(lines)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PushError(f"repo id must have the form 'user/name' (letters, digits, '-', '_', '.'), got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"invalid repo id {repo_id!r}: {error}") from error
    return repo_id


def _match(relative: str, rules) -> Optional[str]:
    parts = relative.split("/")
    for pattern, reason in rules:
        if pattern.endswith("/"):
            if any(fnmatch.fnmatch(part, pattern[:-1]) for part in parts[:-1]):
                return reason
        elif fnmatch.fnmatch(parts[-1], pattern):
            return reason
    return None


def exclusion_rules(include_training_state: bool = False) -> tuple:
    rules = HOUSEKEEPING_PATTERNS + UNSAFE_PATTERNS + TRAINING_STATE_PATTERNS
    return rules if include_training_state else rules + DYNAMICS_STATE_PATTERNS


def select_files(folder: str | os.PathLike, include_training_state: bool = False,
                 include_private: bool = False) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """(files to upload as (path, bytes), files left out as (path, reason)), both sorted by path."""
    folder = Path(folder)
    kind = folder_kind(folder)
    rules = exclusion_rules(include_training_state)
    selected, left_out = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        reason = _match(relative, rules)
        if reason is None and path.is_symlink():
            reason = "symbolic link"
        if reason is not None:
            left_out.append((relative, reason))
            continue
        if _GLOB_CHARACTERS.search(relative):
            raise PushError(f"{relative!r} contains one of * ? [ ]; rename it or move it out of {folder}")
        selected.append((relative, path.stat().st_size))
    if kind == "adapter" and not include_private:
        _check_no_private_tiers(folder, [p for p, _ in selected])
    return selected, left_out


def _dynamics_state_tiers(path: Path) -> set[str]:
    """Tiers whose dynamics a DynamicLoRA state file holds, from its metadata (none recorded before format 2)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return set(json.loads(metadata.get(DYNAMICS_STATE_TIERS_METADATA, "[]")))


def _check_no_private_tiers(folder: Path, selected: list[str]) -> None:
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "DYNAMIC_LORA":
        return
    private = {t for t, p in (config.get("tier_privacy") or {}).items() if p == "private"}
    if not private:
        return
    for relative in selected:
        if not relative.endswith(".safetensors"):
            continue
        shapes = safetensors_shapes(folder / relative)
        if relative == DYNAMICS_STATE_TENSORS_NAME:
            leaked = {t for key in shapes for t in private if f".{t}." in key}
            # format 2 stores no tensor of a tier whose state the weights determine: the file names its tiers
            leaked |= private & _dynamics_state_tiers(folder / relative)
        else:
            leaked = {m["tier"] for key in shapes if (m := _TIER_KEY.search(key)) and m["tier"] in private}
        if leaked:
            raise PushError(
                f"{relative} holds tiers {sorted(leaked)} marked private (tier_privacy); re-save the adapter "
                "without them (the default of save_pretrained) or pass include_private=True / --include_private"
            )


def push_to_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    include_training_state: bool = False,
    include_private: bool = False,
    keep_card: bool = False,
    card_options: Optional[dict] = None,
    api: Optional[HfApi] = None,
) -> PushPlan:
    """Render the card (unless `keep_card`), select the files, and upload them (unless `dry_run`).

    The dry run writes nothing and calls nothing on the network; it returns the plan whose `describe()` lists
    exactly the files and sizes a real push uploads.
    """
    folder = Path(folder)
    try:
        kind = folder_kind(folder)
    except CardError as error:
        raise PushError(str(error)) from error
    check_repo_id(repo_id)
    if keep_card:
        if not (folder / CARD_NAME).is_file():
            raise PushError(f"keep_card=True but {folder} has no {CARD_NAME}; run `reso-hf card {folder}` first")
        card_text = (folder / CARD_NAME).read_text(encoding="utf-8")
    else:
        card_text = str(render_card(folder, repo_id=repo_id, **(card_options or {})))
    selected, left_out = select_files(folder, include_training_state, include_private)
    files = dict(selected)
    files[CARD_NAME] = len(card_text.encode("utf-8"))
    plan = PushPlan(folder=str(folder), repo_id=repo_id, private=private, kind=kind,
                    files=sorted(files.items()), left_out=left_out, card=card_text)
    if dry_run:
        return plan
    if not keep_card:
        from ..dynamic_lora.serialization import atomic_write_text

        atomic_write_text(str(folder / CARD_NAME), card_text)
    api = api or HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    info = api.upload_folder(
        repo_id=getattr(repo_url, "repo_id", repo_id), folder_path=str(folder), repo_type="model", token=token,
        commit_message=commit_message or f"Upload {kind} with reso-hf",
        allow_patterns=[path for path, _ in plan.files],
        ignore_patterns=[p if not p.endswith("/") else p + "*" for p, _ in exclusion_rules(include_training_state)]
        + [f"*/{p}" for p, _ in exclusion_rules(include_training_state) if not p.endswith("/")],
    )
    plan.commit_url = getattr(info, "commit_url", None)
    return plan
