"""Arguments of `reso-hf train|sft|eval`: HfArgumentParser dataclasses, filled from a YAML recipe then the CLI.

A recipe is a flat YAML mapping whose keys are fields of these dataclasses or of
`transformers.TrainingArguments`; every field is also a `--flag`, and flags given on the command line win
over the recipe. An unknown recipe key is an error that names it. Nested mappings (`config_overrides`,
`dynamic_lora`) are passed on as JSON strings.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml
from transformers import HfArgumentParser

from .data import CHAT_TEMPLATE_CHOICES

MODEL_PRESETS = ("tiny", "small", "medium", "large")


@dataclass
class DataArguments:
    dataset_name: str = field(default="timdettmers/openassistant-guanaco",
                              metadata={"help": "Hub dataset id (or local dataset folder) used when no data_files are given."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    train_split: str = field(default="train", metadata={"help": "Split of dataset_name used for training."})
    eval_split: Optional[str] = field(default="test", metadata={"help": "Split of dataset_name used for evaluation."})
    data_files: Optional[list[str]] = field(default=None, metadata={
        "help": "Local training files (.jsonl/.json/.parquet/.arrow, one format) with a guanaco `text` column; "
                "overrides dataset_name."})
    eval_data_files: Optional[list[str]] = field(default=None, metadata={"help": "Local evaluation files (same formats)."})
    use_bundled_sample: bool = field(default=False, metadata={
        "help": "Train on the guanaco-format sample shipped with reso-hf (121 rows; offline demos and tests)."})
    text_field: str = field(default="text", metadata={"help": "Column holding the '### Human: ...### Assistant: ...' text."})
    eval_fraction: float = field(default=0.1, metadata={
        "help": "Fraction of train held out for evaluation when there is no eval split (0 disables)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/eval hold-out split."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use at most this many evaluation rows."})
    block_size: int = field(default=512, metadata={"help": "Tokens per training row (packed block or truncation length)."})
    packing: bool = field(default=True, metadata={
        "help": "Pack documents into blocks of block_size tokens with position ids restarting per document."})
    assistant_only_loss: bool = field(default=True, metadata={
        "help": "Compute the loss on assistant tokens only (false: on every token)."})
    chat_template: str = field(default="auto", metadata={
        "help": "Formatting: 'model' (the tokenizer's own template), 'guanaco', or 'auto' (own if any, else guanaco).",
        "choices": list(CHAT_TEMPLATE_CHOICES)})
    strict: bool = field(default=False, metadata={"help": "Reject a malformed row with an error instead of skipping and counting it."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the dataset instead of loading it in memory (needs max_steps)."})

    def __post_init__(self):
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.chat_template not in CHAT_TEMPLATE_CHOICES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_CHOICES}, got {self.chat_template!r}")

    def hub_dataset_id(self) -> str | None:
        """The Hub dataset id when the data comes from the Hub (not local files, a folder or the sample)."""
        if self.use_bundled_sample or self.data_files or os.path.isdir(self.dataset_name):
            return None
        return self.dataset_name

    def source(self) -> str:
        if self.use_bundled_sample:
            return "bundled sample (reso_hf/data/guanaco_sample.jsonl)"
        return ", ".join(self.data_files) if self.data_files else self.dataset_name


@dataclass
class PretrainArguments:
    model_preset: str = field(default="tiny", metadata={
        "help": "ResoLLM size preset.", "choices": list(MODEL_PRESETS)})
    config_overrides: Optional[str] = field(default=None, metadata={
        "help": "JSON object of ResoLLMConfig fields overriding the preset (a mapping in YAML)."})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "Tokenizer folder or Hub id; default: the bytes-only ResoTokenizer, or a trained BPE with tokenizer_vocab_size."})
    tokenizer_vocab_size: Optional[int] = field(default=None, metadata={
        "help": "Train a byte-level BPE of this size on the training texts before training the model."})
    resume: bool = field(default=False, metadata={
        "help": "Resume exactly from the last complete checkpoint in output_dir."})

    def __post_init__(self):
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"model_preset must be one of {MODEL_PRESETS}, got {self.model_preset!r}")


@dataclass
class SftArguments:
    base_model: Optional[str] = field(default=None, metadata={
        "help": "Causal LM to fine-tune: Hub id, local folder, or a .gguf file (dequantised by transformers)."})
    gguf_file: Optional[str] = field(default=None, metadata={
        "help": "GGUF file name inside base_model (a folder or Hub repo); implied when base_model ends in .gguf."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the base model's own code (trusted repos only)."})
    dynamic_lora: Optional[str] = field(default=None, metadata={
        "help": "JSON object of DynamicLoraConfig fields (a mapping in YAML), e.g. tiers, tier_ranks, target_modules."})
    resume: bool = field(default=False, metadata={"help": "Resume exactly from the last complete checkpoint in output_dir."})


@dataclass
class EvalArguments:
    model: Optional[str] = field(default=None, metadata={"help": "Model folder (or Hub id) to evaluate."})
    output_file: Optional[str] = field(default=None, metadata={
        "help": "Where to write eval_results.json (default: <model>/eval_results.json)."})
    batch_size: int = field(default=8, metadata={"help": "Evaluation batch size (blocks)."})
    num_samples: int = field(default=3, metadata={"help": "Generation samples to write (prompts from the eval data)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per sample (greedy)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's own code (trusted folders only)."})


# ----------------------------------------------------------------------------------------------------------


def load_recipe(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: a recipe must be a YAML mapping of field: value, got {type(recipe).__name__}")
    return recipe


def recipe_to_argv(recipe: dict, dataclass_types, source: str = "recipe") -> list[str]:
    """Turn a recipe mapping into CLI flags (so YAML values get exactly the CLI's type conversion)."""
    known = {f.name for cls in dataclass_types for f in fields(cls) if f.init}
    argv = []
    for key, value in recipe.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {close}?" if close else "; see --help for the allowed fields"
            raise ValueError(f"{source}: unknown field {key!r}{hint}")
        if value is None:
            raise ValueError(f"{source}: field {key!r} is null; omit it to keep its default")
        if isinstance(value, list):
            argv += [f"--{key}", *[json.dumps(v) if isinstance(v, dict) else str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_recipe(dataclass_types, recipe_path: Optional[str], argv: list[str]) -> tuple:
    """Dataclasses from a YAML recipe (optional) overridden by CLI flags. Unknown fields are errors."""
    parser = HfArgumentParser(dataclass_types)
    recipe_argv = recipe_to_argv(load_recipe(recipe_path), dataclass_types, recipe_path) if recipe_path else []
    return parser.parse_args_into_dataclasses(args=recipe_argv + list(argv))


def json_mapping(value, name: str) -> dict:
    """A JSON object given as a string (CLI) or already a dict."""
    if value is None:
        return {}
    mapping = json.loads(value) if isinstance(value, str) else value
    if not isinstance(mapping, dict):
        raise ValueError(f"{name} must be a JSON object (a mapping), got {mapping!r}")
    return mapping
