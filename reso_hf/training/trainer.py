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
"""

from __future__ import annotations

import json
import os
import shutil

from transformers import PreTrainedModel, Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from ..dynamic_lora.serialization import atomic_write_text
from .distributed import fsdp_on_cpu_processes, original_class, without_tied_copies

STAGING_DIR = ".staging"
TRAINING_ARGS_JSON = "training_args.json"


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


class AtomicCheckpointTrainer(Trainer):
    def create_accelerator_and_postprocess(self) -> None:
        with fsdp_on_cpu_processes():  # FSDP on CPU processes too (see .distributed)
            super().create_accelerator_and_postprocess()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.is_fsdp_enabled and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            # Trainer writes no model with a sharded state dict; the folder must load with from_pretrained
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
            if self.args.push_to_hub and not _internal_call:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING_DIR)
        self._get_output_dir = lambda trial=None: staging  # Trainer writes (and rotates) in staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()  # every rank has written its rng_state_<rank>.pth
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
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
        output_dir = output_dir if output_dir is not None else self.args.output_dir
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

    `quiet` drops the console printer and progress bar (the demo prints its own summary).
    Returns `(train_result, eval_metrics)`.
    """
    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    return train_result, eval_metrics
