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

from transformers import Trainer
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import rotate_checkpoints

from ..dynamic_lora.serialization import apply_umask_mode_to_safetensors, atomic_write_text

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
        super()._save(output_dir, state_dict)
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

    `quiet` drops the console printer and progress bar (the demo prints its own summary).
    Returns `(train_result, eval_metrics)`.
    """
    if quiet:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    eval_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    return train_result, eval_metrics
