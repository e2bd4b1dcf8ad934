"""DynamicLoRA supervised fine-tuning of any causal LM through `Trainer` + `DynamicLoraCallback` (SPEC §5-§6).

    reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model HuggingFaceTB/SmolLM2-135M-Instruct
    reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model path/to/SmolLM2-135M-Instruct.Q4_1.gguf

The base model is a Hub id, a local folder, or a .gguf file (dequantised by transformers). Conversations
are formatted with the model's own chat template (or the guanaco one, `chat_template`), loss on the
assistant tokens only by default. Writes to `output_dir`: `checkpoint-N/` (atomic, with the dynamics
state), `adapter/` (the PEFT adapter folder with its dynamics state and audit log), `loss_curves.png`,
`dynamic_lora_dynamics.png`, `run_summary.json` (with the adapter's health report).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from peft import get_peft_model
from transformers import (
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..dynamic_lora import DynamicLoraCallback, DynamicLoraConfig, find_dynamic_lora_tuner
from ..dynamic_lora.serialization import atomic_write_bytes
from ..loading import ModelSource, load_causal_lm, load_tokenizer, resolve_model_source
from .arguments import DataArguments, SftArguments, json_mapping, parse_recipe
from .data import build_datasets, check_vocabulary
from ..hub import write_card
from .reporting import DYNAMICS_PLOT_NAME, LOSS_PLOT_NAME, RUN_SUMMARY_NAME, run_summary, write_json, write_loss_plot
from .run_folder import prepare_output_dir
from .distributed import whole_adapter_factors
from .trainer import AtomicCheckpointTrainer, train_and_evaluate

ARGUMENT_TYPES = (SftArguments, DataArguments, TrainingArguments)
DEFAULT_DYNAMIC_LORA = {"target_modules": "all-linear"}


def base_model_source(sft_args: SftArguments) -> ModelSource:
    """The checked base model (a Hub id, a folder or a .gguf file); an adapter folder is not a base."""
    source = resolve_model_source(sft_args.base_model, sft_args.gguf_file, field="base_model")
    if source.is_adapter:
        raise ValueError(f"base_model {sft_args.base_model!r} is a PEFT adapter folder; pass the model it adapts "
                         f"({source.base.name!r}) or a merged copy of both")
    return source


def load_base(source: ModelSource, sft_args: SftArguments):
    tokenizer = load_tokenizer(source, trust_remote_code=sft_args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_causal_lm(source, dtype=torch.float32, trust_remote_code=sft_args.trust_remote_code)
    return model, tokenizer


def dynamic_lora_config(sft_args: SftArguments) -> DynamicLoraConfig:
    settings = {**DEFAULT_DYNAMIC_LORA, **json_mapping(sft_args.dynamic_lora, "dynamic_lora")}
    return DynamicLoraConfig(task_type="CAUSAL_LM", **settings)


def dynamics_digest(model) -> str:
    """blake2b of the adapter weights and the full dynamics state: equal on every rank when they agree."""
    tuner = find_dynamic_lora_tuner(model)
    tensors, payload = tuner.dynamics_state_dict()
    # the saved state leaves out what the weights determine (anchors, ...), so the weights are hashed too
    tensors = {**tensors, **{f"weights.{key}": value for key, value in tuner.tier_tensors().items()}}
    digest = hashlib.blake2b(json.dumps(payload, sort_keys=True, default=str).encode(), digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def digests_across_ranks(model) -> list[str]:
    with whole_adapter_factors(model):  # FSDP shards the factors that the digest hashes
        mine = dynamics_digest(model)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def write_dynamics_plot(log_history: list[dict], path: str) -> None:
    """The logged `dynamic_lora/*` series that change during the run, against the step."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("dynamic_lora/") and "step" in entry:
                series.setdefault(key, []).append((entry["step"], value))
    varying = sorted(k for k, points in series.items() if len({v for _, v in points}) > 1)[:12]
    figure, axes = plt.subplots(max(1, (len(varying) + 2) // 3), 3, figsize=(12, 2.6 * max(1, (len(varying) + 2) // 3)),
                                squeeze=False)
    for axis, key in zip(axes.flat, varying):
        steps, values = zip(*series[key])
        axis.plot(steps, values)
        axis.set_title(key.removeprefix("dynamic_lora/"), fontsize=8)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(varying):]:
        axis.axis("off")
    figure.suptitle("DynamicLoRA dynamics during SFT")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def run(sft_args: SftArguments, data_args: DataArguments, training_args: TrainingArguments,
        quiet: bool = False) -> dict:
    """quiet: no progress bar and no printed log lines (the demo prints its own summary)."""
    source = base_model_source(sft_args)  # a bad path fails here, before any data is prepared
    plan = prepare_output_dir("sft", (sft_args, data_args, training_args), data_args, training_args,
                              resume=sft_args.resume, overwrite=sft_args.overwrite_output_dir)
    if plan.finished_summary is not None:
        return plan.finished_summary
    checkpoint = plan.checkpoint
    lora_config = dynamic_lora_config(sft_args)  # every DynamicLoraConfig value is checked before any loading
    set_seed(training_args.seed)
    base, tokenizer = load_base(source, sft_args)
    check_vocabulary(tokenizer, base, source.name)
    train_dataset, eval_dataset, stats = build_datasets(data_args, tokenizer)
    base.config.use_cache = False  # with a cache, transformers ignores the packed position-id boundaries
    model = get_peft_model(base, lora_config)
    tuner = find_dynamic_lora_tuner(model)
    trainer = AtomicCheckpointTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=default_data_collator,
    )
    # first, so the reporting integrations see its metrics; it restores the checkpoint's dynamics state once
    # Trainer has reloaded the adapter weights
    DynamicLoraCallback.attach(trainer, resume_from_checkpoint=checkpoint)
    train_result, eval_metrics = train_and_evaluate(trainer, checkpoint, quiet)
    base.config.use_cache = True
    adapter_dir = os.path.join(training_args.output_dir, "adapter")
    trainer.save_final_model(adapter_dir)
    digests = digests_across_ranks(model)
    health = tuner.health()
    summary = run_summary(
        "sft", trainer, train_result, eval_metrics, data_args, stats,
        {"model_type": base.config.model_type, "base_model": sft_args.base_model,
         "parameters": sum(p.numel() for p in model.parameters()),
         "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        adapter_dir, checkpoint,
        extra={"dynamic_lora": {"health": health, "dynamics_digest_per_rank": digests,
                                "ranks_agree": len(set(digests)) == 1}},
    )
    if trainer.is_world_process_zero():
        write_loss_plot(trainer.state.log_history, os.path.join(training_args.output_dir, LOSS_PLOT_NAME),
                        f"DynamicLoRA SFT of {sft_args.base_model}")
        write_dynamics_plot(trainer.state.log_history, os.path.join(training_args.output_dir, DYNAMICS_PLOT_NAME))
        write_json(os.path.join(training_args.output_dir, RUN_SUMMARY_NAME), summary)
        write_json(os.path.join(adapter_dir, RUN_SUMMARY_NAME), summary)
        if os.path.exists(sft_args.base_model):  # an adapter card must name its base model's Hub id
            print(f"no adapter card written: the base model {sft_args.base_model!r} is a local path; "
                  f"write one with `reso-hf card {adapter_dir} --base_model <hub id of the base>`")
        else:
            write_card(adapter_dir)  # the save hook ran before the summary existed
    return summary


def main(recipe: str | None, argv: list[str]) -> int:
    run(*parse_recipe(ARGUMENT_TYPES, recipe, argv))
    return 0
