"""Supervised fine-tuning of any causal LM through `Trainer`: a DynamicLoRA adapter, the resonant components of a
converted ResoLLM, both, or every parameter (`--train`, SPEC §5-§6, §8).

    reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model HuggingFaceTB/SmolLM2-135M-Instruct
    reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model path/to/SmolLM2-135M-Instruct.Q4_1.gguf
    reso-hf sft recipes/reso_llm/sft_smollm2_resonant.yaml       # a converted ResoLLM, resonant+dynamic_lora

The base model is a Hub id, a local folder, or a .gguf file (dequantised by transformers). Conversations
are formatted with the model's own chat template (or the guanaco one, `chat_template`), loss on the
assistant tokens only by default. What `--train` trains and where it goes:

- `dynamic_lora` (default): a DynamicLoRA adapter; `adapter/` (the PEFT adapter folder with its dynamics state
  and audit log) and `dynamic_lora_dynamics.png`.
- `resonant`: only the parameters conversion adds to a ResoLLM (`reso_hf.conversion.resonant_parameter_names`),
  everything else frozen, no PEFT; `model/` (the whole model, like `reso-hf train`).
- `resonant+dynamic_lora`: the adapter, plus the resonant components trained in full and saved with it (PEFT's
  `modules_to_save`: the adapter folder holds their trained copies and reloads them); `adapter/`.
- `full`: every parameter, no PEFT; `model/`.

Also written to `output_dir`: `checkpoint-N/` (atomic, with the dynamics state), `loss_curves.png` and
`run_summary.json` (with the mode, the trainable parameter count and, with an adapter, its health report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import torch
from peft import get_peft_model
from transformers import (
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from ..conversion import resonant_parameter_names
from ..dynamic_lora import DynamicLoraCallback, DynamicLoraConfig, find_dynamic_lora_tuner
from ..dynamic_lora.serialization import atomic_write_bytes
from ..loading import ModelSource, load_causal_lm, load_tokenizer, resolve_model_source
from .arguments import ArgumentError, DataArguments, SftArguments, json_mapping, parse_recipe
from .data import build_datasets, check_vocabulary
from .fim import add_fim_tokens
from ..hub import write_card
from .reporting import DYNAMICS_PLOT_NAME, LOSS_PLOT_NAME, RUN_SUMMARY_NAME, run_summary, write_json, write_loss_plot
from .run_folder import prepare_output_dir
from .distributed import whole_adapter_factors
from .trainer import AtomicCheckpointTrainer, train_and_evaluate

logger = logging.getLogger(__name__)
ARGUMENT_TYPES = (SftArguments, DataArguments, TrainingArguments)
DEFAULT_DYNAMIC_LORA = {"target_modules": "all-linear"}
# The modules that hold the resonant parameters (`resonant_parameter_names`), by the attribute name PEFT's
# `modules_to_save` matches: the prime-code projection, each layer's Kuramoto coupling, each coherence gate.
RESONANT_MODULES = ("prime_code", "kuramoto", "coherence_gate")
CONVERT_COMMAND = "reso-hf convert {source} OUT --kuramoto --coherence_gating --prime_embedding"


def base_model_source(sft_args: SftArguments) -> ModelSource:
    """The checked base model (a Hub id, a folder or a .gguf file); an adapter folder is not a base."""
    source = resolve_model_source(sft_args.base_model, sft_args.gguf_file, field="base_model")
    if source.is_adapter:
        raise ValueError(f"base_model {sft_args.base_model!r} is a PEFT adapter folder; pass the model it adapts "
                         f"({source.base.name!r}) or a merged copy of both")
    return source


def check_resonant_base(source: ModelSource, sft_args: SftArguments) -> None:
    """`--train resonant` (and `resonant+dynamic_lora`) needs a ResoLLM: checked on its config, before the weights
    load."""
    from transformers import AutoConfig

    from ..registration import register_reso_llm

    register_reso_llm()
    options = {"trust_remote_code": sft_args.trust_remote_code}
    if source.gguf_file:
        options["gguf_file"] = source.gguf_file
    model_type = getattr(AutoConfig.from_pretrained(source.location, **options), "model_type", None)
    if model_type != "reso_llm":
        raise ValueError(f"--train {sft_args.train} trains the resonant components of a ResoLLM, but base_model "
                         f"{source.name!r} is a {model_type!r} model; convert it first "
                         f"({CONVERT_COMMAND.format(source=source.name)}) and pass "
                         f"OUT as base_model, or train it with --train dynamic_lora or --train full")


def resonant_modules(model, sft_args: SftArguments) -> list[str]:
    """The `RESONANT_MODULES` the model holds (its switched-on components); an error when it holds none."""
    names = resonant_parameter_names(model)
    if not names:
        raise ValueError(f"--train {sft_args.train}: base_model {sft_args.base_model!r} is a ResoLLM with no resonant "
                         f"component switched on (prime_embedding, kuramoto and coherence_gating are off), so there "
                         f"is nothing to train; convert its source with at least one of them "
                         f"({CONVERT_COMMAND.format(source='SOURCE')})")
    return [module for module in RESONANT_MODULES if any(f".{module}." in f".{name}" for name in names)]


def trainable_model(base, sft_args: SftArguments, lora_config: DynamicLoraConfig | None):
    """The model `Trainer` trains, with `requires_grad` on exactly what `sft_args.train` trains."""
    if sft_args.train == "full":
        return base.requires_grad_(True)
    if sft_args.train == "resonant":
        trained = set(resonant_parameter_names(base))
        for name, parameter in base.named_parameters():
            parameter.requires_grad_(name in trained)
        return base
    if sft_args.train == "resonant+dynamic_lora":
        # PEFT trains a full copy of each module named in modules_to_save, saves it with the adapter and puts it
        # back when the adapter loads; the adapter's own layers never go inside those modules
        lora_config.modules_to_save = sorted({*(lora_config.modules_to_save or []), *resonant_modules(base, sft_args)})
    return get_peft_model(base, lora_config)


def resonant_learning_rates(model, sft_args: SftArguments) -> dict[str, float]:
    """{name: --resonant_learning_rate} for the trained resonant parameters (under PEFT: their modules_to_save
    copies), or {} when the option is not set."""
    if sft_args.resonant_learning_rate is None:
        return {}
    return {name: sft_args.resonant_learning_rate for name, parameter in model.named_parameters()
            if parameter.requires_grad and any(f".{module}." in f".{name}" for module in RESONANT_MODULES)}


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


def set_early_exit_loss_scale(base, scale: float) -> None:
    """`--early_exit_loss_scale`: the base's `adaptive_depth.loss_scale` (validated with the rest of its config)."""
    if getattr(base.config, "model_type", None) != "reso_llm":
        raise ArgumentError(f"early_exit_loss_scale needs a ResoLLM base (the per-layer exits are ResoLLM's), got "
                            f"model_type {getattr(base.config, 'model_type', None)!r}", "early_exit_loss_scale")
    depth = dataclasses.replace(base.config.adaptive_depth, loss_scale=float(scale))
    if scale > 0 and depth.min_layers >= base.config.num_hidden_layers:
        raise ArgumentError(f"early_exit_loss_scale: adaptive_depth.min_layers={depth.min_layers} leaves no layer to "
                            f"exit from in {base.config.num_hidden_layers} layers", "early_exit_loss_scale")
    base.config.adaptive_depth = depth


def run(sft_args: SftArguments, data_args: DataArguments, training_args: TrainingArguments,
        quiet: bool = False) -> dict:
    """quiet: no progress bar and no printed log lines (the demo prints its own summary)."""
    source = base_model_source(sft_args)  # a bad path fails here, before any data is prepared
    if sft_args.trains_resonant():
        check_resonant_base(source, sft_args)
    plan = prepare_output_dir("sft", (sft_args, data_args, training_args), data_args, training_args,
                              resume=sft_args.resume, overwrite=sft_args.overwrite_output_dir)
    if plan.finished_summary is not None:
        return plan.finished_summary
    checkpoint = plan.checkpoint
    lora_config = None
    if sft_args.trains_adapter():
        lora_config = dynamic_lora_config(sft_args)  # every DynamicLoraConfig value is checked before any loading
    elif sft_args.dynamic_lora:
        logger.warning("--train %s trains no adapter: the dynamic_lora settings are not used", sft_args.train)
    set_seed(training_args.seed)
    base, tokenizer = load_base(source, sft_args)
    if sft_args.early_exit_loss_scale is not None:
        set_early_exit_loss_scale(base, sft_args.early_exit_loss_scale)
    if sft_args.trains_resonant():
        resonant_modules(base, sft_args)  # a ResoLLM with every component off has nothing to train
    if data_args.fim_rate > 0:
        # SmolLM2-like tokenizers already hold the sentinels; otherwise they are added and the embeddings grown
        # (new rows are trained only where the embeddings are: --train full)
        add_fim_tokens(tokenizer, base)
    check_vocabulary(tokenizer, base, source.name)
    train_dataset, eval_dataset, stats = build_datasets(data_args, tokenizer)
    base.config.use_cache = False  # with a cache, transformers ignores the packed position-id boundaries
    model = trainable_model(base, sft_args, lora_config)
    trainer = AtomicCheckpointTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=default_data_collator,
        parameter_learning_rates=resonant_learning_rates(model, sft_args),
    )
    if lora_config is not None:
        # first, so the reporting integrations see its metrics; it restores the checkpoint's dynamics state once
        # Trainer has reloaded the adapter weights
        DynamicLoraCallback.attach(trainer, resume_from_checkpoint=checkpoint)
    train_result, eval_metrics = train_and_evaluate(trainer, checkpoint, quiet)
    base.config.use_cache = True
    final_dir = os.path.join(training_args.output_dir, "adapter" if lora_config is not None else "model")
    trainer.save_final_model(final_dir)
    extra = {}
    if lora_config is not None:
        digests = digests_across_ranks(model)
        extra["dynamic_lora"] = {"health": find_dynamic_lora_tuner(model).health(),
                                 "dynamics_digest_per_rank": digests, "ranks_agree": len(set(digests)) == 1}
    summary = run_summary(
        "sft", trainer, train_result, eval_metrics, data_args, stats,
        {"model_type": base.config.model_type, "base_model": sft_args.base_model, "train": sft_args.train,
         "parameters": sum(p.numel() for p in model.parameters()),
         "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        final_dir, checkpoint, extra=extra,
    )
    if trainer.is_world_process_zero():
        write_loss_plot(trainer.state.log_history, os.path.join(training_args.output_dir, LOSS_PLOT_NAME),
                        f"SFT ({sft_args.train}) of {sft_args.base_model}")
        if lora_config is not None:
            write_dynamics_plot(trainer.state.log_history, os.path.join(training_args.output_dir, DYNAMICS_PLOT_NAME))
        write_json(os.path.join(training_args.output_dir, RUN_SUMMARY_NAME), summary)
        write_json(os.path.join(final_dir, RUN_SUMMARY_NAME), summary)
        write_final_card(final_dir, sft_args, base.config.model_type)
    return summary


def write_final_card(final_dir: str, sft_args: SftArguments, model_type: str) -> None:
    """The card of adapter/ or model/ (the save hook ran before the summary existed), where one can be written."""
    kind = "adapter" if sft_args.trains_adapter() else "model"
    if kind == "model" and model_type != "reso_llm":
        print(f"no model card written: {final_dir} holds a {model_type!r} model (model cards are for ResoLLM)")
    elif os.path.exists(sft_args.base_model):  # a card must name its base model's Hub id
        print(f"no {kind} card written: the base model {sft_args.base_model!r} is a local path; write one with "
              f"`reso-hf card {final_dir} --base_model <hub id of the base>`")
    else:
        write_card(final_dir)


def main(recipe: str | None, argv: list[str]) -> int:
    run(*parse_recipe(ARGUMENT_TYPES, recipe, argv))
    return 0
