"""`Trainer` with checkpoints that are never half-written, and no pickled objects of our own on disk.

Trainer writes `checkpoint-N/` file by file; a kill during that leaves a folder that `--resume` would pick
up and fail on. `AtomicCheckpointTrainer` lets Trainer write the whole checkpoint into
`<output_dir>/.staging/checkpoint-N`, waits for every rank, then publishes it with one `os.replace`
(a directory rename is atomic on POSIX). Leftovers of a killed run are removed at the next start.

What Trainer writes in a checkpoint (transformers 5): `model.safetensors` (always safetensors in v5,
there is no `save_safetensors` switch any more), `config.json`, `generation_config.json`,
`trainer_state.json`, the tokenizer files, and four `torch.save` files of plain state dicts:
`optimizer.pt`, `scheduler.pt`, `rng_state.pth` (`rng_state_<rank>.pth` under DDP) and `scaler.pt` with
mixed precision. Those hold only tensors, numbers and strings (zip-format `torch.save`, which is pickle
inside), and Trainer loads them with `torch.load(..., weights_only=True)`: optimizer and scheduler load
that way as they are; `rng_state.pth` also holds numpy's RNG state and loads with `weights_only=True` only
inside `transformers.trainer_pt_utils.safe_globals()`, which allowlists numpy's array reconstruction (no
arbitrary code). Tests check both. Trainer also
writes `training_args.bin`, a pickle of the whole `TrainingArguments` object that only loads with
`weights_only=False` and that resuming never reads: we replace it by `training_args.json`.

Two things Trainer does not do across a resume, added here:

- the mean training loss of the whole run. Trainer's `training_loss` covers the steps of one `train()` call,
  so a resumed run reported its last segment only. Each checkpoint also gets `run_loss.json` (the sum of the
  per-step losses up to it), and `train()` returns the mean over every step of the run.
- stopping at the last step. Resuming from a checkpoint that is already at the run's last step made Trainer
  run one more step (global step 25 of 24: it checks for the end only after a step). `train()` then restores
  that checkpoint and returns without training.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerState
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import TrainOutput, get_last_checkpoint, rotate_checkpoints

from ..dynamic_lora.dynamics import HEALTH_STATES
from ..dynamic_lora.serialization import apply_umask_mode_to_safetensors, atomic_write_text
from .auxiliary_losses import AuxiliaryLossArguments, AuxiliaryLosses
from .distributed import fsdp_on_cpu_processes, original_class, whole_adapter_factors, without_tied_copies

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
TRAINING_ARGS_JSON = "training_args.json"
RUN_LOSS_NAME = "run_loss.json"  # {"loss_sum": sum of the per-step training losses, "global_step": ...}


def clean_staging(output_dir: str) -> None:
    """Remove checkpoints a killed run left half-written (they were never published)."""
    staging = os.path.join(output_dir, STAGING_DIR)
    if os.path.isdir(staging):
        shutil.rmtree(staging)


def publish_directory(source: str, target: str) -> None:
    """Move a fully written folder into place in one rename (replacing an older one of the same name)."""
    for root, _, files in os.walk(source):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    if os.path.exists(target):
        retired = target + ".retired"
        os.replace(target, retired)
        os.replace(source, target)
        shutil.rmtree(retired)
    else:
        os.replace(source, target)


DYNAMIC_LORA_PREFIX = "dynamic_lora/"


def console_logs(logs: dict) -> dict:
    """A log entry as the console shows it: DynamicLoRA's metrics (about 15 per tier, 90 with the default tiers)
    become one short `dynamic_lora` summary. `state.log_history` and the `report_to` integrations get every key."""
    metrics = {key[len(DYNAMIC_LORA_PREFIX):]: value for key, value in logs.items() if key.startswith(DYNAMIC_LORA_PREFIX)}
    if not metrics:
        return logs
    shown = {key: value for key, value in logs.items() if not key.startswith(DYNAMIC_LORA_PREFIX)}
    parts = []
    if "health" in metrics:
        code = int(metrics["health"])
        parts.append(HEALTH_STATES[code] if 0 <= code < len(HEALTH_STATES) else f"health {code}")
    if "migrations_this_step" in metrics:
        parts.append(f"{int(metrics['migrations_this_step'])} migrations")
    screened = [value for key, value in metrics.items() if key.endswith("/screened_fraction")]
    if screened:
        parts.append(f"{sum(screened) / len(screened):.0%} screened (mean of {len(screened)} tiers)")
    shown["dynamic_lora"] = ", ".join(parts) if parts else f"{len(metrics)} metrics"
    return shown


class ConsoleProgressCallback(ProgressCallback):
    """Trainer's progress bar, printing `console_logs(logs)`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


class ConsolePrinterCallback(PrinterCallback):
    """Trainer's printer (used with disable_tqdm), printing `console_logs(logs)`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=console_logs(logs or {}), **kwargs)


def read_run_loss(checkpoint: str) -> tuple[float, int] | None:
    """(sum of the per-step training losses, steps) recorded in a checkpoint; None for an older checkpoint."""
    path = os.path.join(checkpoint, RUN_LOSS_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        recorded = json.load(handle)
    return recorded["loss_sum"], recorded["global_step"]


def split_learning_rate_groups(optimizer, model, learning_rates: dict[str, float]) -> None:
    """Move each named parameter out of its group into a group (one per original group and rate) with its own `lr`.

    Done before the scheduler exists, so the scheduler takes each group's rate as its base; the groups depend only on
    the names and their order, so a resumed run rebuilds the same groups and its optimizer state loads into them."""
    unknown = sorted(set(learning_rates) - {name for name, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"parameter_learning_rates names parameters the model does not have: {unknown[:5]}")
    rate_of = {id(parameter): learning_rates[name] for name, parameter in model.named_parameters()
               if name in learning_rates}
    new_groups = []
    for group in optimizer.param_groups:
        by_rate: dict[float, list] = {}
        kept = []
        for parameter in group["params"]:
            if id(parameter) in rate_of:
                by_rate.setdefault(rate_of[id(parameter)], []).append(parameter)
            else:
                kept.append(parameter)
        group["params"] = kept
        for rate, parameters in by_rate.items():
            new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": parameters, "lr": rate})
    for group in new_groups:
        optimizer.add_param_group(group)


class AtomicCheckpointTrainer(Trainer):
    """`auxiliary_losses` (`AuxiliaryLossArguments`, optional): weighted resonance/coherence/holographic terms added
    to the training loss and logged as `aux/<name>_loss` (see `auxiliary_losses`).
    `parameter_learning_rates` (optional): {parameter name: learning rate} for parameters that train at their own
    rate; they go to parameter groups of their own, which the scheduler scales like the others."""

    # sum of the per-step losses and steps before this `train()` call (a resumed run's earlier segments)
    _loss_before = (0.0, 0)

    def __init__(self, *args, auxiliary_losses: AuxiliaryLossArguments | None = None,
                 parameter_learning_rates: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.parameter_learning_rates = dict(parameter_learning_rates or {})
        self.auxiliary_losses = (AuxiliaryLosses(auxiliary_losses, self.args.seed)
                                 if auxiliary_losses is not None and auxiliary_losses.active else None)
        for default, concise in ((ProgressCallback, ConsoleProgressCallback), (PrinterCallback, ConsolePrinterCallback)):
            if self.pop_callback(default) is not None:
                self.add_callback(concise)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.auxiliary_losses is None or not model.training:  # evaluation keeps the plain LM loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with self.auxiliary_losses.capture(model) as captured:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        terms = self.auxiliary_losses.terms(captured, inputs.get("attention_mask"), self.state.global_step)
        auxiliary = self.auxiliary_losses.weighted_sum(terms)
        # training_step divides the loss by the accumulation steps unless the LM loss is already normalised over
        # the whole accumulated batch (num_items_in_batch); the per-micro-batch auxiliary means must be divided then.
        scaled_for_accumulation = (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else
                                   (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                                   or self.compute_loss_func is not None)
        if scaled_for_accumulation:
            auxiliary = auxiliary / self.current_gradient_accumulation_steps
        loss = loss + auxiliary
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.auxiliary_losses is not None and "loss" in logs:  # a training log entry
            logs = {**logs, **self.auxiliary_losses.pop_log_means()}
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.parameter_learning_rates:
            split_learning_rate_groups(optimizer, self.model if model is None else model, self.parameter_learning_rates)
        return optimizer

    def create_accelerator_and_postprocess(self) -> None:
        with fsdp_on_cpu_processes():  # FSDP on CPU processes too (see .distributed)
            super().create_accelerator_and_postprocess()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call=_internal_call)
        with whole_adapter_factors(self.model):  # the DynamicLoRA dynamics state is saved against whole factors
            if "FULL_STATE_DICT" in str(self.accelerator.state.fsdp_plugin.state_dict_type):
                return super().save_model(output_dir, _internal_call=_internal_call)
            # Trainer writes no model with a sharded state dict; the folder must load with from_pretrained
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, whose `training_loss` is the mean over the whole run, and which only restores a
        checkpoint that is already at the run's last step (see the module docstring)."""
        self._loss_before = (0.0, 0)
        if resume_from_checkpoint is True:  # Trainer's "the last checkpoint in output_dir" (it raises if there is none)
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, str):
            recorded = read_run_loss(resume_from_checkpoint)
            if recorded is None:
                logger.warning("%s has no %s (written by an older reso-hf): the reported training loss covers "
                               "the steps after it only", resume_from_checkpoint, RUN_LOSS_NAME)
            else:
                self._loss_before = recorded
            state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
            last_step = self.args.max_steps if self.args.max_steps > 0 else state.max_steps
            if state.global_step >= last_step:
                return self._restore_final_checkpoint(resume_from_checkpoint, state)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        loss = self.run_training_loss(output.training_loss, output.global_step)
        return TrainOutput(output.global_step, loss, {**output.metrics, "train_loss": loss})

    def run_training_loss(self, segment_loss: float, global_step: int) -> float:
        """The mean per-step training loss of the whole run, from this call's mean and the earlier segments'."""
        loss_sum, steps = self._loss_before
        if steps == 0:
            return segment_loss
        return (loss_sum + segment_loss * (global_step - steps)) / max(global_step, 1)

    def _restore_final_checkpoint(self, checkpoint: str, state: TrainerState) -> TrainOutput:
        print(f"{checkpoint} is at the run's last step ({state.global_step}): restoring it without training")
        self._load_from_checkpoint(checkpoint)
        self.state = state
        loss_sum, steps = self._loss_before
        loss = loss_sum / steps if steps else None  # unknown for a checkpoint without run_loss.json
        return TrainOutput(state.global_step, loss, {"train_loss": loss, "train_runtime": 0.0})

    def _running_loss_sum(self) -> float:
        """Sum of the per-step losses of the whole run so far, averaged over ranks like Trainer's logged loss
        (a collective: every rank calls it)."""
        pending = getattr(self, "_tr_loss", None)
        pending = nested_gather(pending, self.args.parallel_mode).mean().item() if pending is not None else 0.0
        return self._loss_before[0] + getattr(self, "_total_loss_scalar", 0.0) + pending

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        loss_sum = self._running_loss_sum()
        self._get_output_dir = lambda trial=None: staging  # Trainer writes (and rotates) in staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank has written its rng_state_<rank>.pth
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            atomic_write_text(os.path.join(staging, name, RUN_LOSS_NAME),
                              json.dumps({"loss_sum": loss_sum, "global_step": self.state.global_step}))
            publish_directory(os.path.join(staging, name), os.path.join(run_dir, name))
            if self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(staging, run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir=None, state_dict=None) -> None:
        if state_dict is not None and isinstance(self.model, PreTrainedModel):  # gathered by FSDP or DeepSpeed
            state_dict = without_tied_copies(self.model, state_dict)
        with original_class(self.model):  # FSDP's generated class would be saved as the remote code
            super()._save(output_dir, state_dict)
        if not self.args.should_save:  # Trainer calls _save on every rank; only the saving one writes files
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        apply_umask_mode_to_safetensors(output_dir)
        pickled = os.path.join(output_dir, TRAINING_ARGS_NAME)
        if os.path.exists(pickled):
            os.remove(pickled)
        atomic_write_text(os.path.join(output_dir, TRAINING_ARGS_JSON),
                          json.dumps(json.loads(self.args.to_json_string()), indent=2, sort_keys=True))

    def save_final_model(self, target: str) -> None:
        """Save the trained model (+ tokenizer) as a Hub-ready folder, atomically."""
        staging = os.path.join(self.args.output_dir, STAGING_DIR, os.path.basename(os.path.normpath(target)))
        self.save_model(staging)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_directory(staging, target)
            clean_staging(self.args.output_dir)
        self.accelerator.wait_for_everyone()


def train_and_evaluate(trainer: Trainer, checkpoint: str | None, quiet: bool):
    """`trainer.train` (resuming from `checkpoint`) then `evaluate` when there is an eval set.

    `quiet` drops the console printer and progress bar (the demo prints its own summary); otherwise they print
    `console_logs` of each entry.
    Returns `(train_result, eval_metrics)`.
    """
    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    return train_result, eval_metrics
