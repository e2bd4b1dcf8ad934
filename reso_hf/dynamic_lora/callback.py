"""Trainer integration: run `dynamic_step()` after every optimizer step and log its metrics (SPEC §5.10)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from transformers import TrainerCallback


def find_dynamic_lora_tuner(model):
    """The DynamicLoraModel inside `model` (unwrapping DDP/FSDP `.module` and PeftModel `.base_model`)."""
    from .model import DynamicLoraModel

    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, DynamicLoraModel):
            return model
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "base_model") and model.base_model is not model:
            model = model.base_model
        else:
            break
        seen += 1
    raise ValueError(
        "DynamicLoraCallback needs a model with a DynamicLoRA adapter (peft.get_peft_model(model, "
        f"DynamicLoraConfig(...))); got {type(model).__name__}."
    )


def flatten_metrics(metrics: dict[str, Any], prefix: str = "dynamic_lora") -> dict[str, float]:
    """Numeric metrics as flat `dynamic_lora/<...>` keys, the form Trainer's loggers accept."""
    flat: dict[str, float] = {}
    health_codes = {"HEALTHY": 0, "ACCEPTABLE": 1, "DEGRADED": 2, "CRITICAL": 3}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
        elif key == "health" and value in health_codes:
            flat[name] = float(health_codes[value])
    return flat


def boundary_steps(boundary: Sequence[Any], rows_per_step: int) -> list[int]:
    """Optimizer steps after which to consolidate, from a per-row `boundary` flag of data read in order.

    `boundary[i]` is true when row i starts a new task or session (a `boundary` column of a dataset that is not
    shuffled, as continual training reads it); `rows_per_step` = per-device batch x gradient accumulation x data
    parallel size. A boundary at row i falls into optimizer step floor(i / rows_per_step) (0-based), so the fast
    tiers are consolidated once that many steps are done: the batch that holds the first row of the new task is the
    first that trains on fresh fast tiers (a batch that mixes two tasks counts as the new task's). Row 0 starts the
    run and needs no consolidation.
    """
    if not isinstance(rows_per_step, int) or isinstance(rows_per_step, bool) or rows_per_step <= 0:
        raise ValueError(f"rows_per_step must be a positive integer, got {rows_per_step!r}.")
    steps = []
    for row, flag in enumerate(boundary):
        if flag not in (True, False):
            raise ValueError(f"boundary[{row}] must be a boolean flag, got {flag!r}.")
        step = row // rows_per_step
        if flag and row > 0 and step > 0 and (not steps or steps[-1] != step):
            steps.append(step)
    return steps


def _check_consolidation_arguments(consolidate_every, consolidate_on_epoch, consolidate_at_steps) -> list[int]:
    if consolidate_every is not None and (
        not isinstance(consolidate_every, int) or isinstance(consolidate_every, bool) or consolidate_every <= 0
    ):
        raise ValueError(f"DynamicLoraCallback.consolidate_every must be None or a positive integer (optimizer steps "
                         f"between two consolidations), got {consolidate_every!r}.")
    if not isinstance(consolidate_on_epoch, bool):
        raise ValueError(f"DynamicLoraCallback.consolidate_on_epoch must be True or False, got {consolidate_on_epoch!r}.")
    if consolidate_at_steps is None:
        return []
    if not isinstance(consolidate_at_steps, Iterable) or isinstance(consolidate_at_steps, (str, bytes)):
        raise ValueError(f"DynamicLoraCallback.consolidate_at_steps must be a list of positive integers (optimizer "
                         f"steps, e.g. from boundary_steps()), got {consolidate_at_steps!r}.")
    steps = list(consolidate_at_steps)
    bad = [v for v in steps if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if bad:
        raise ValueError(f"DynamicLoraCallback.consolidate_at_steps must hold positive integers (optimizer steps), "
                         f"got {bad[:5]}.")
    return sorted(set(steps))


class DynamicLoraCallback(TrainerCallback):
    """Runs the DynamicLoRA dynamics after each optimizer step (before gradients are zeroed).

    The latest metrics are added to every Trainer log entry (`trainer.state.log_history`) as
    `dynamic_lora/...` keys (health coded 0 HEALTHY .. 3 CRITICAL). Trainer calls its own reporting
    integrations before user callbacks; to have them see the metrics too, add this callback with
    `DynamicLoraCallback.attach(trainer)`, which puts it first.

    Resuming: pass the checkpoint given to `trainer.train(resume_from_checkpoint=...)` as
    `resume_from_checkpoint` too. Trainer reloads the adapter weights of a checkpoint with
    `load_adapter`, which knows nothing of the dynamics state saved next to them; the callback restores that
    state once Trainer has loaded everything (`on_train_begin`), so training continues bit for bit.

    Consolidation (`DynamicLoraModel.consolidate`, README "Consolidation"), after the step's dynamics:
    `consolidate_every=N` every N optimizer steps (global steps N, 2N, ...); `consolidate_on_epoch=True` at each
    boundary between two epochs (not after the last); `consolidate_at_steps=[...]` after those global steps, e.g.
    `boundary_steps(dataset["boundary"], rows_per_step)` for a `boundary` column marking task or session changes.
    Each report is kept in `consolidations` and its truncation error logged as `dynamic_lora/consolidation/...`.
    """

    def __init__(self, adapter_name: Optional[str] = None, resume_from_checkpoint: Optional[str] = None,
                 consolidate_every: Optional[int] = None, consolidate_on_epoch: bool = False,
                 consolidate_at_steps: Optional[Iterable[int]] = None) -> None:
        self.adapter_name = adapter_name
        self.resume_from_checkpoint = resume_from_checkpoint
        self.consolidate_every = consolidate_every
        self.consolidate_on_epoch = consolidate_on_epoch
        self.consolidate_at_steps = _check_consolidation_arguments(consolidate_every, consolidate_on_epoch,
                                                                   consolidate_at_steps)
        self.last_metrics: dict[str, Any] = {}
        self.consolidations: list[dict[str, Any]] = []
        self.steps = 0
        self._epochs_begun = 0

    @classmethod
    def attach(cls, trainer, adapter_name: Optional[str] = None, resume_from_checkpoint: Optional[str] = None,
               **consolidation: Any) -> "DynamicLoraCallback":
        callback = cls(adapter_name, resume_from_checkpoint, **consolidation)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = find_dynamic_lora_tuner(model)
        adapters = [self.adapter_name] if self.adapter_name else tuner.active_adapters
        dynamic = [name for name in adapters if tuner.peft_config[name].dynamics_enabled]
        if getattr(args, "deepspeed_plugin", None) is not None and dynamic:
            raise ValueError(
                "DynamicLoRA's dynamics read the factors' gradients after each optimizer step; DeepSpeed ZeRO moves "
                "each gradient into its own partitioned buffers during backward and leaves param.grad empty, so "
                f"there are none to read (adapters {dynamic}). Train with DDP (recipes/accelerate/multi_gpu_ddp.yaml) or "
                "FSDP (recipes/accelerate/fsdp.yaml), or set dynamics_enabled=False in the DynamicLoraConfig."
            )
        if self.resume_from_checkpoint is None:
            return control
        with tuner.gathered_factors():  # restored against whole factors, which FSDP has sharded by now
            restored = tuner.load_dynamics_state(self.resume_from_checkpoint, adapter_name=self.adapter_name)
        if not restored:
            raise FileNotFoundError(
                f"resume_from_checkpoint={self.resume_from_checkpoint!r} holds no DynamicLoRA dynamics state "
                "(dynamic_lora_state.json + .safetensors), so training cannot continue exactly; a checkpoint that "
                "left private tiers out has none. Resume from a checkpoint saved with all tiers."
            )
        return control

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        tuner = find_dynamic_lora_tuner(model)
        self.last_metrics = tuner.dynamic_step(optimizer=optimizer, adapter_name=self.adapter_name)
        self.steps += 1
        # Trainer increments global_step after this event: the step just taken is global_step + 1
        done = state.global_step + 1
        if (self.consolidate_every is not None and done % self.consolidate_every == 0) or done in self.consolidate_at_steps:
            self._consolidate(tuner, optimizer, done)
        return control

    def on_epoch_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._epochs_begun += 1
        if self.consolidate_on_epoch and self._epochs_begun > 1:
            self._consolidate(find_dynamic_lora_tuner(model), optimizer, state.global_step)
        return control

    def _consolidate(self, tuner, optimizer, step: int) -> None:
        if self.consolidations and self.consolidations[-1]["global_step"] == step:
            return  # a step that is both a multiple of consolidate_every and an epoch boundary consolidates once
        report = tuner.consolidate(adapter_name=self.adapter_name, optimizer=optimizer)
        summary = {k: v for k, v in report.items() if k != "per_module"}
        self.consolidations.append({"global_step": step, **summary})
        self.last_metrics = {**self.last_metrics, "consolidation": {
            "truncation_error": report["truncation_error"],
            "relative_truncation_error": report["relative_truncation_error"],
            "max_relative_truncation_error": report["max_relative_truncation_error"],
        }}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.last_metrics:
            return control
        flat = flatten_metrics(self.last_metrics)
        logs.update(flat)
        # Trainer appended a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(flat)
        return control
