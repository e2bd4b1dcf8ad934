"""The output folder of a training run: which run it holds, and whether that run is finished.

A run records `run_fingerprint.json` in its output_dir when it starts: the fields that decide what is trained
(every argument except where and how often things are written, logged, evaluated or pushed), the seed among
them, and the size and a content digest of every local data file. Before a run touches its output_dir,
`prepare_output_dir` decides:

- no run there (no checkpoint-N/, no final model/adapter/ folder, no run_summary.json): start;
- `--overwrite_output_dir`: delete the run that is there (only the files a run writes), then start;
- `--resume`: continue from the last complete checkpoint, or, when the run already reached its last step,
  do nothing and say so (a run whose final folder was not written yet is finished from its last checkpoint
  without training, see `AtomicCheckpointTrainer.train`);
- otherwise: refuse with `OutputDirError` naming the folder, what differs, and both options. Only the very same
  run, already finished, is not an error: there is nothing to do.

A new run in a folder holding another run would otherwise have its lower-numbered checkpoints deleted by the
rotation, overwrite `model/`, and a later `--resume` would continue the old run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields, is_dataclass

from transformers import TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..dynamic_lora.serialization import atomic_write_json
from .data import bundled_sample_path, local_files
from .reporting import DYNAMICS_PLOT_NAME, LOSS_PLOT_NAME, RUN_SUMMARY_NAME, utc_now
from .trainer import STAGING_DIR, clean_staging

logger = logging.getLogger(__name__)

RUN_FINGERPRINT_NAME = "run_fingerprint.json"
RUN_FINGERPRINT_SCHEMA = "reso-hf/run_fingerprint/v1"
FINAL_FOLDERS = ("model", "adapter")
# Everything a run writes into output_dir (besides checkpoint-N/): what --overwrite_output_dir deletes.
RUN_FILES = (*FINAL_FOLDERS, "runs", STAGING_DIR, RUN_SUMMARY_NAME, RUN_FINGERPRINT_NAME, LOSS_PLOT_NAME,
             DYNAMICS_PLOT_NAME)
# Arguments that do not change what is trained: where and how often things are written, logged, evaluated or
# pushed, and how the run is started. Every other argument is part of the fingerprint.
# Fields added after runs were already being fingerprinted: at their default they are left out, so a run folder
# written before they existed still matches (and `--resume` continues it).
OMITTED_AT_DEFAULT = {"resonance_loss_weight", "coherence_loss_weight", "holographic_loss_weight",
                      "holographic_subset_fraction", "holographic_ridge"}
NOT_IN_FINGERPRINT = {
    "output_dir", "resume", "overwrite_output_dir", "strict", "data_files", "eval_data_files",  # files: by content
    "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
    "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps",
    "eval_delay", "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
    "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
    "bf16_full_eval", "fp16_full_eval", "save_only_model", "save_strategy", "save_steps", "save_on_each_node",
    "save_total_limit", "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id",
    "hub_strategy", "hub_always_push", "hub_revision", "restore_callback_states_from_checkpoint",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "ddp_timeout", "skip_memory_metrics", "do_train", "do_eval", "do_predict",
    "resume_from_checkpoint", "local_rank", "torch_empty_cache_steps", "debug",
}
DIGEST_WINDOW = 4 << 20  # bytes hashed at each end of a data file


class OutputDirError(FileExistsError):
    """output_dir holds another run; the message names the folder, what differs, and the two options."""


@dataclass
class RunPlan:
    checkpoint: str | None = None  # resume from this checkpoint (None: start from scratch)
    finished_summary: dict | None = None  # the run is already finished: this is its run_summary.json
    message: str | None = None  # what the main process prints


# ----------------------------------------------------------------------------------------------------------
# The fingerprint


def run_fingerprint(kind: str, arguments, data_args) -> dict:
    """What identifies a run: its kind, the arguments that decide what is trained, and its local data."""
    values = {}
    for argument in arguments:
        items = argument.to_dict() if isinstance(argument, TrainingArguments) else asdict(argument)
        for entry in (f for f in fields(argument) if f.init):
            name = entry.name
            if name in OMITTED_AT_DEFAULT and getattr(argument, name) == entry.default:
                continue
            if name == "assistant_only_loss":  # not given and given as its default are the same run
                values[name] = argument.loss_on_assistant_only()
            elif name not in NOT_IN_FINGERPRINT:
                values[name] = _json_value(items.get(name, getattr(argument, name)))
    data = {}
    for split, paths in (local_files(data_args) or {}).items():
        data[split] = [_file_digest(path) for path in paths]
    identity = {"kind": kind, "fields": values, "data_files": data}
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16).hexdigest()
    return {"schema": RUN_FINGERPRINT_SCHEMA, "digest": digest, **identity}


def _json_value(value):
    if is_dataclass(value):
        value = asdict(value)
    return json.loads(json.dumps(value, default=lambda item: getattr(item, "value", str(item))))


def _file_digest(path: str) -> dict:
    """Size and blake2b of the first and last DIGEST_WINDOW bytes (the whole file when it is smaller): cheap for
    any size, and it changes when rows are added, removed or edited near either end."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(DIGEST_WINDOW))
        if size > 2 * DIGEST_WINDOW:
            handle.seek(size - DIGEST_WINDOW)
        digest.update(handle.read())
    name = "(bundled sample)" if os.path.abspath(path) == os.path.abspath(bundled_sample_path()) else os.path.basename(path)
    return {"file": name, "bytes": size, "blake2b": digest.hexdigest()}


def fingerprint_differences(recorded: dict, current: dict) -> list[str]:
    """'field: recorded -> current' for every difference (data files included)."""
    differences = []
    if recorded.get("kind") != current["kind"]:
        differences.append(f"kind: {recorded.get('kind')} -> {current['kind']}")
    old, new = recorded.get("fields", {}), current["fields"]
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            differences.append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    if recorded.get("data_files") != current["data_files"]:
        differences.append(f"data files: {_describe_files(recorded.get('data_files'))} -> "
                           f"{_describe_files(current['data_files'])}")
    return differences


def _describe_files(files) -> str:
    if not files:
        return "none"
    return ", ".join(f"{entry['file']} ({entry['bytes']} bytes, {entry['blake2b'][:8]})"
                     for split in sorted(files) for entry in files[split])


# ----------------------------------------------------------------------------------------------------------
# The folder


@dataclass
class FolderState:
    checkpoints: list[str]  # complete checkpoint-N folders, oldest first
    last_checkpoint_step: int | None
    summary: dict | None  # output_dir/run_summary.json, written when a run ends
    fingerprint: dict | None
    final_folders: list[str]

    @property
    def holds_a_run(self) -> bool:
        return bool(self.checkpoints or self.summary or self.final_folders)

    def describe(self) -> str:
        parts = [os.path.basename(c) for c in self.checkpoints] + [f"{name}/" for name in self.final_folders]
        if self.summary is not None:
            parts.append(RUN_SUMMARY_NAME)
        return ", ".join(parts)


def inspect_output_dir(output_dir: str) -> FolderState:
    if not os.path.isdir(output_dir):
        return FolderState([], None, None, None, [])
    checkpoints = sorted((path for path in glob.glob(os.path.join(output_dir, "checkpoint-*"))
                          if re.fullmatch(r"checkpoint-\d+", os.path.basename(path)) and os.path.isdir(path)),
                         key=lambda path: int(path.rsplit("-", 1)[1]))
    last = get_last_checkpoint(output_dir)
    return FolderState(
        checkpoints=checkpoints,
        last_checkpoint_step=int(last.rsplit("-", 1)[1]) if last else None,
        summary=_read_json(os.path.join(output_dir, RUN_SUMMARY_NAME)),
        fingerprint=_read_json(os.path.join(output_dir, RUN_FINGERPRINT_NAME)),
        final_folders=[name for name in FINAL_FOLDERS if os.path.isdir(os.path.join(output_dir, name))],
    )


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def target_steps(training_args: TrainingArguments, output_dir: str, state: FolderState) -> int | None:
    """The step the run ends at: max_steps, or (epoch-based) what the last checkpoint or summary recorded."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    if state.last_checkpoint_step is not None:
        trainer_state = _read_json(os.path.join(output_dir, f"checkpoint-{state.last_checkpoint_step}",
                                                "trainer_state.json"))
        if trainer_state and trainer_state.get("max_steps"):
            return trainer_state["max_steps"]
    return (state.summary or {}).get("training", {}).get("max_steps")


def finished_step(training_args: TrainingArguments, output_dir: str, state: FolderState) -> int | None:
    """The final step when the folder holds a finished run (final folder and summary at the last step)."""
    if state.summary is None or not state.final_folders:
        return None
    step = state.summary.get("training", {}).get("global_step")
    target = target_steps(training_args, output_dir, state)
    if step is None or target is None or step < target:
        return None
    if state.last_checkpoint_step is not None and state.last_checkpoint_step > step:
        return None  # a later checkpoint than the summary: the summary is of an earlier stop
    return step


def remove_run(output_dir: str, state: FolderState) -> None:
    """Delete what a run wrote into output_dir (checkpoints, final folder, reports); nothing else."""
    for path in state.checkpoints + [os.path.join(output_dir, name) for name in RUN_FILES]:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def prepare_output_dir(kind: str, arguments, data_args, training_args: TrainingArguments, resume: bool,
                       overwrite: bool) -> RunPlan:
    """Decide what to do with output_dir (see the module docstring), record this run's fingerprint there, and
    return the plan. Raises OutputDirError for a folder that holds another run, FileNotFoundError for --resume
    with nothing to resume."""
    output_dir = training_args.output_dir
    if resume and overwrite:
        raise OutputDirError(f"--resume continues the run in {output_dir!r} and --overwrite_output_dir replaces it: "
                             f"give only one of them")
    fingerprint = run_fingerprint(kind, arguments, data_args)
    is_main = training_args.process_index == 0
    with training_args.main_process_first(local=False, desc="output_dir"):
        state = inspect_output_dir(output_dir)
        plan = _plan(state, fingerprint, training_args, resume, overwrite)
        if plan.message and is_main:
            print(plan.message)
        if plan.finished_summary is None and is_main:
            if overwrite and state.holds_a_run:
                print(f"--overwrite_output_dir: deleting the run in {output_dir} ({state.describe()})")
                remove_run(output_dir, state)
            clean_staging(output_dir)
            os.makedirs(output_dir, exist_ok=True)
            atomic_write_json(os.path.join(output_dir, RUN_FINGERPRINT_NAME), {**fingerprint, "recorded_at": utc_now()})
    return plan


def _plan(state: FolderState, fingerprint: dict, training_args: TrainingArguments, resume: bool,
          overwrite: bool) -> RunPlan:
    output_dir = training_args.output_dir
    finished = finished_step(training_args, output_dir, state)
    target = target_steps(training_args, output_dir, state)
    differences = fingerprint_differences(state.fingerprint, fingerprint) if state.fingerprint else []
    if resume:
        if differences:
            logger.warning("--resume in %s with settings that differ from the recorded run: %s", output_dir,
                           "; ".join(differences))
        if finished is not None:
            return RunPlan(finished_summary=state.summary,
                           message=f"{output_dir} holds a finished run (step {finished} of {target}); nothing to do")
        checkpoint = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N folder in output_dir {output_dir!r}")
        return RunPlan(checkpoint=checkpoint)
    if overwrite or not state.holds_a_run:
        return RunPlan()
    options = ("--resume continues it, --overwrite_output_dir deletes it and starts this run, or choose "
               "another --output_dir")
    if state.fingerprint is None:
        raise OutputDirError(f"{output_dir} already holds a run ({state.describe()}) with no {RUN_FINGERPRINT_NAME} "
                             f"to compare with; {options}")
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise OutputDirError(f"{output_dir} already holds a different run ({shown}); {options}")
    if finished is not None:
        return RunPlan(finished_summary=state.summary,
                       message=f"{output_dir} already holds this run, finished at step {finished} of {target}; "
                               f"nothing to do (--overwrite_output_dir trains it again)")
    stopped = f"stopped at checkpoint-{state.last_checkpoint_step}" if state.checkpoints else "stopped"
    of_steps = f" of {target} steps" if target else ""
    raise OutputDirError(f"{output_dir} already holds this run, {stopped}{of_steps}; {options}")
