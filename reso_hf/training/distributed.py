"""FSDP (accelerate's FSDP2, `recipes/accelerate/fsdp.yaml`) and DeepSpeed for `reso-hf train` and `reso-hf sft`.

Gaps between accelerate + Trainer and what these commands need, closed by `AtomicCheckpointTrainer`:

- accelerate turns its FSDP plugin on only for accelerator devices (its MULTI_GPU, MULTI_XPU, ... branch).
  CPU processes stay MULTI_CPU and the plugin is dropped without a word, so `accelerate launch --config_file
  recipes/accelerate/fsdp.yaml` on a CPU machine trained with DDP. torch's `fully_shard` itself works on CPU
  processes over gloo (torch 2.13), and the 2-process CPU test runs the whole FSDP path that way:
  `fsdp_on_cpu_processes()` keeps the plugin for CPU processes exactly as accelerate does for GPUs.
- `Trainer.save_model` writes no model at all when FSDP uses SHARDED_STATE_DICT (only the sharded resume
  files of a checkpoint, from `_save_optimizer_and_scheduler`), so `model/` had no weights and `adapter/` and
  the checkpoints had no DynamicLoRA dynamics state. `AtomicCheckpointTrainer.save_model` gathers the full
  weights on rank 0 for `save_pretrained` whatever the state-dict type.
- `fully_shard` swaps the model's class for a generated `FSDP<Name>` defined in torch's `_fsdp_init.py`.
  `save_pretrained` of a remote-code model copies the file defining the model's class into the folder and
  names it in `auto_map`: the folder got torch's FSDP sources and `"_fsdp_init.FSDPResoLLMForCausalLM"`, so
  `trust_remote_code` loading failed. `original_class(model)` saves under the model's own class.
- DynamicLoRA's dynamics state is saved on the main process only and encoded against the adapter's factors,
  which FSDP shards: `whole_adapter_factors` gathers them on every rank around the save.
- A state dict gathered from shards (FSDP, DeepSpeed) holds tied weights as separate tensors, which
  `save_pretrained` only recognises as tied by their shared storage: `model.safetensors` got a second copy of
  the embedding as `lm_head.weight`. `without_tied_copies` drops it, as a one-process save does.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

from ..dynamic_lora.model import DynamicLoraModel


@contextmanager
def fsdp_on_cpu_processes():
    """While active, an `Accelerator` given an FSDP plugin (from TrainingArguments' `fsdp_config` or from
    `accelerate launch`'s ACCELERATE_USE_FSDP) on CPU processes runs FSDP, as it would on GPUs."""
    original = AcceleratorState.__init__

    @functools.wraps(original)
    def keep_fsdp_plugin(state, *args, fsdp_plugin=None, **kwargs):
        original(state, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.distributed_type = DistributedType.FSDP  # what accelerate sets for MULTI_GPU
            if state.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(state.mixed_precision)
            state.fsdp_plugin = fsdp_plugin
            # accelerate's own last step: a later AcceleratorState() copies PartialState's type back over it
            PartialState._shared_state["distributed_type"] = state.distributed_type

    AcceleratorState.__init__ = keep_fsdp_plugin
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


@contextmanager
def original_class(model):
    """While active, a `fully_shard`-ed model has its own class again (FSDP's hooks live on the instance and
    keep working; only FSDPModule's methods such as `unshard` are gone meanwhile). No-op for other models."""
    swapped = type(model)
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.__class__ = next(cls for cls in swapped.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield model
    finally:
        model.__class__ = swapped


def without_tied_copies(model, state_dict: dict) -> dict:
    """`state_dict` without the tied targets (e.g. `lm_head.weight`) that equal their source."""
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return {key: value for key, value in state_dict.items()
            if not (key in tied and tied[key] in state_dict and torch.equal(value, state_dict[tied[key]]))}


def whole_adapter_factors(model):
    """`DynamicLoraModel.gathered_factors()` of a PEFT model with a DynamicLoRA adapter; no-op for other models."""
    tuner = getattr(model, "base_model", None)
    return tuner.gathered_factors() if isinstance(tuner, DynamicLoraModel) else nullcontext()
