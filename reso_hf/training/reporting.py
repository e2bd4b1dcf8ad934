"""The end-of-run artefacts: a PNG of the loss curves and `run_summary.json`, both written atomically.

`run_summary.json` (schema "reso-hf/run_summary/v1"), read by the model-card renderer:

    schema        "reso-hf/run_summary/v1"
    kind          "pretrain" | "sft"
    created_at    ISO-8601 UTC time
    model         {"model_type", "parameters", "trainable_parameters", "base_model" (sft), "preset" (pretrain)}
    data          {"source", "dataset_id" (Hub id or null), "block_size", "packing", "assistant_only_loss", "chat_template",
                   "rows": {split: n}, "malformed_rows": {split: n}, "malformed_reasons": {split: {reason: n}},
                   "examples": {split: n}}
    training      {"global_step", "max_steps", "epoch", "train_loss" (mean over every step of the run, resumed
                   segments included), "train_runtime_s", "train_tokens", "world_size",
                   "distributed_type" (accelerate's: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ...), "seed", "learning_rate",
                   "resumed_from" (checkpoint folder or null)}
    eval          {"eval_loss", "perplexity"} (empty when there is no eval split)
    dynamic_lora  {"health": ...} (sft only)
    artifacts     {"model_dir", "loss_plot", "checkpoints": [...]}
    versions      {"reso_hf", "transformers", "torch", "peft", "accelerate", "datasets"}
"""

from __future__ import annotations

import io
import json
import math
import os
from datetime import datetime, timezone

from ..dynamic_lora.serialization import atomic_write_bytes, atomic_write_text

RUN_SUMMARY_NAME = "run_summary.json"
RUN_SUMMARY_SCHEMA = "reso-hf/run_summary/v1"
LOSS_PLOT_NAME = "loss_curves.png"
DYNAMICS_PLOT_NAME = "dynamic_lora_dynamics.png"  # sft only


def versions() -> dict:
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    import reso_hf

    return {"reso_hf": reso_hf.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "datasets": datasets.__version__}


def perplexity(loss) -> float | None:
    return None if loss is None else float(math.exp(min(loss, 50.0)))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n")


def loss_curves(log_history: list[dict]) -> dict:
    """{"train": [(step, loss)], "eval": [(step, loss)]} from `trainer.state.log_history`."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    return {"train": train, "eval": evaluation}


def write_loss_plot(log_history: list[dict], path: str, title: str) -> None:
    """Training and evaluation loss against the optimizer step, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(log_history)
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            steps, losses = zip(*points)
            axis.plot(steps, losses, marker="o" if name == "eval" else None, markersize=3, label=f"{name} loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def run_summary(kind: str, trainer, train_result, eval_metrics: dict, data_args, data_stats, model_info: dict,
                model_dir: str, resumed_from: str | None, extra: dict | None = None) -> dict:
    state, args = trainer.state, trainer.args
    output_dir = args.output_dir
    eval_loss = eval_metrics.get("eval_loss")
    summary = {
        "schema": RUN_SUMMARY_SCHEMA,
        "kind": kind,
        "created_at": utc_now(),
        "model": model_info,
        "data": {"source": data_args.source(), "dataset_id": data_args.hub_dataset_id(), "block_size": data_args.block_size, "packing": data_args.packing,
                 "assistant_only_loss": data_args.loss_on_assistant_only(), "chat_template": data_args.chat_template,
                 **data_stats.to_dict()},
        "training": {"global_step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch,
                     "train_loss": train_result.training_loss,
                     "train_runtime_s": train_result.metrics.get("train_runtime"),
                     "train_tokens": state.num_input_tokens_seen or None,
                     "world_size": args.world_size, "distributed_type": trainer.accelerator.distributed_type.value,
                     "seed": args.seed, "learning_rate": args.learning_rate,
                     "resumed_from": resumed_from},
        "eval": {} if eval_loss is None else {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)},
        "artifacts": {"model_dir": model_dir, "loss_plot": os.path.join(output_dir, LOSS_PLOT_NAME),
                      "checkpoints": sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))},
        "versions": versions(),
    }
    summary.update(extra or {})
    return summary
