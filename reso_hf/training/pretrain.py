"""Pretrain a ResoLLM from scratch on guanaco-format data with `Trainer` (SPEC §6).

    reso-hf train recipes/reso_llm/pretrain_sample.yaml [--max_steps 50 ...]
    python -m reso_hf.train --recipe recipes/reso_llm/pretrain_guanaco.yaml
    accelerate launch -m reso_hf.train --recipe ...

Writes to `output_dir`: `checkpoint-N/` (atomic), `model/` (the Hub-ready folder), `loss_curves.png`,
`run_summary.json` and `run_fingerprint.json`. `--resume` continues exactly from the last complete checkpoint;
a folder holding another run is refused unless `--resume` or `--overwrite_output_dir` (see `run_folder`).
"""

from __future__ import annotations

import logging
import os
from itertools import islice

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .. import modeling
from ..modeling.tokenization_reso_llm import create_default_tokenizer, train_tokenizer
from .arguments import ArgumentError, DataArguments, PretrainArguments, json_mapping, parse_recipe
from .data import build_datasets, load_raw_splits
from .fim import add_fim_tokens
from ..hub import write_card
from .reporting import LOSS_PLOT_NAME, RUN_SUMMARY_NAME, run_summary, write_json, write_loss_plot
from .run_folder import prepare_output_dir
from .trainer import AtomicCheckpointTrainer, train_and_evaluate

logger = logging.getLogger(__name__)
ARGUMENT_TYPES = (PretrainArguments, DataArguments, TrainingArguments)
MAX_TOKENIZER_TEXTS = 100_000


def build_tokenizer(model_args: PretrainArguments, data_args: DataArguments, checkpoint: str | None):
    if checkpoint is not None:  # the exact tokenizer the interrupted run trained with
        return AutoTokenizer.from_pretrained(checkpoint)
    if model_args.tokenizer:
        return AutoTokenizer.from_pretrained(model_args.tokenizer)
    if model_args.tokenizer_vocab_size:
        train, _ = load_raw_splits(data_args)
        texts = (row[data_args.text_field] for row in islice(iter(train), MAX_TOKENIZER_TEXTS)
                 if isinstance(row[data_args.text_field], str))
        return train_tokenizer(texts, model_args.tokenizer_vocab_size)
    return create_default_tokenizer()


def build_model(model_args: PretrainArguments, tokenizer, block_size: int):
    preset = getattr(modeling, f"{model_args.model_preset}_config")
    settings = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    settings.update(json_mapping(model_args.config_overrides, "config_overrides"))
    if settings["vocab_size"] < len(tokenizer):
        raise ArgumentError(f"config_overrides: vocab_size {settings['vocab_size']} is smaller than the tokenizer's "
                            f"{len(tokenizer)} tokens; leave vocab_size out (it is taken from the tokenizer)")
    config = preset(**settings)
    if config.max_position_embeddings < block_size:
        raise ValueError(f"block_size {block_size} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}; lower block_size or override max_position_embeddings")
    return AutoModelForCausalLM.from_config(config)


def run(model_args: PretrainArguments, data_args: DataArguments, training_args: TrainingArguments,
        quiet: bool = False) -> dict:
    """quiet: no progress bar and no printed log lines (the demo prints its own summary)."""
    plan = prepare_output_dir("pretrain", (model_args, data_args, training_args), data_args, training_args,
                              resume=model_args.resume, overwrite=model_args.overwrite_output_dir)
    if plan.finished_summary is not None:
        return plan.finished_summary
    checkpoint = plan.checkpoint
    tokenizer = build_tokenizer(model_args, data_args, checkpoint)
    if data_args.fim_rate > 0:
        add_fim_tokens(tokenizer)  # the model is built afterwards with the tokenizer's size
    train_dataset, eval_dataset, stats = build_datasets(data_args, tokenizer)
    set_seed(training_args.seed)
    model = build_model(model_args, tokenizer, data_args.block_size)
    model.config.use_cache = False  # with a cache, transformers ignores the packed position-id boundaries
    trainer = AtomicCheckpointTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        processing_class=tokenizer, data_collator=default_data_collator, auxiliary_losses=model_args,
    )
    train_result, eval_metrics = train_and_evaluate(trainer, checkpoint, quiet)
    model.config.use_cache = True
    model_dir = os.path.join(training_args.output_dir, "model")
    trainer.save_final_model(model_dir)
    parameters = sum(p.numel() for p in model.parameters())
    summary = run_summary(
        "pretrain", trainer, train_result, eval_metrics, data_args, stats,
        {"model_type": model.config.model_type, "preset": model_args.model_preset, "parameters": parameters,
         "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        model_dir, checkpoint,
    )
    if trainer.is_world_process_zero():
        write_loss_plot(trainer.state.log_history, os.path.join(training_args.output_dir, LOSS_PLOT_NAME),
                        f"ResoLLM ({model_args.model_preset}) pretraining")
        write_json(os.path.join(training_args.output_dir, RUN_SUMMARY_NAME), summary)
        write_json(os.path.join(model_dir, RUN_SUMMARY_NAME), summary)
        write_card(model_dir)  # the save hook ran before the summary existed
    return summary


def main(recipe: str | None, argv: list[str]) -> int:
    run(*parse_recipe(ARGUMENT_TYPES, recipe, argv))
    return 0
