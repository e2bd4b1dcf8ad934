"""Trainer integration: run `dynamic_step()` after every optimizer step and log its metrics (SPEC §5.10)."""

from __future__ import annotations

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
    """

    def __init__(self, adapter_name: Optional[str] = None, resume_from_checkpoint: Optional[str] = None) -> None:
        self.adapter_name = adapter_name
        self.resume_from_checkpoint = resume_from_checkpoint
        self.last_metrics: dict[str, Any] = {}
        self.steps = 0

    @classmethod
    def attach(cls, trainer, adapter_name: Optional[str] = None,
               resume_from_checkpoint: Optional[str] = None) -> "DynamicLoraCallback":
        callback = cls(adapter_name, resume_from_checkpoint)
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
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.last_metrics:
            return control
        flat = flatten_metrics(self.last_metrics)
        logs.update(flat)
        # Trainer appended a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(flat)
        return control
