"""Arguments of `reso-hf train|sft|eval`: HfArgumentParser dataclasses, filled from a YAML recipe then the CLI.

A recipe is a flat YAML mapping whose keys are fields of these dataclasses or of
`transformers.TrainingArguments`; every field is also a `--flag`, and flags given on the command line win
over the recipe. Nested mappings (`config_overrides`, `dynamic_lora`) are passed on as JSON strings.

Everything is checked before any model or data is loaded, and every problem is an `ArgumentError` (a
`ValueError`) whose one-line message names the recipe file and field, or the flag, and what is allowed: an
unknown field or flag, a value of the wrong type (a list where one value is expected, text where a number is),
a value out of range (a negative learning rate, a zero batch size).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Optional

import yaml
from transformers import HfArgumentParser

from .auxiliary_losses import AuxiliaryLossArguments
from .data import CHAT_TEMPLATE_CHOICES
from .fim import check_rate

MODEL_PRESETS = ("tiny", "small", "medium", "large")
# What `reso-hf sft --train` trains: a DynamicLoRA adapter; only the resonant components of a ResoLLM (what
# conversion adds); both (the resonant components saved with the adapter); or every parameter.
TRAIN_MODES = ("dynamic_lora", "resonant", "resonant+dynamic_lora", "full")
DEFAULT_ASSISTANT_ONLY_LOSS = True


class ArgumentError(ValueError):
    """A recipe field or flag that cannot be used; the message names it and what is allowed."""

    def __init__(self, message: str, field_name: str | None = None):
        super().__init__(message)
        self.field_name = field_name


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
    assistant_only_loss: Optional[bool] = field(default=None, metadata={
        "help": "Compute the loss on assistant tokens only (false: on every token). Default: true for train and "
                "sft; for eval, what the model was trained with (its run_summary.json), else true."})
    chat_template: str = field(default="auto", metadata={
        "help": "Formatting: 'model' (the tokenizer's own template), 'guanaco', or 'auto' (own if any, else guanaco).",
        "choices": list(CHAT_TEMPLATE_CHOICES)})
    strict: bool = field(default=False, metadata={"help": "Reject a malformed row with an error instead of skipping and counting it."})
    streaming: bool = field(default=False, metadata={
        "help": "Stream the dataset instead of loading it in memory (needs max_steps)."})
    fim_rate: float = field(default=0.0, metadata={
        "help": "Fraction of documents rearranged for fill-in-the-middle training (0: none); adds the "
                "<fim_prefix>/<fim_suffix>/<fim_middle> tokens and grows the embeddings if needed."})
    fim_spm_rate: float = field(default=0.5, metadata={
        "help": "Among FIM documents, the fraction in SPM order (suffix, then prefix + middle); the others are PSM."})
    fim_seed: int = field(default=0, metadata={"help": "Seed of the FIM draws (each document's draw depends on it "
                                                         "and the document only)."})

    def __post_init__(self):
        check_rate(self.fim_rate, "fim_rate")
        check_rate(self.fim_spm_rate, "fim_spm_rate")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if self.chat_template not in CHAT_TEMPLATE_CHOICES:
            raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_CHOICES}, got {self.chat_template!r}")

    def loss_on_assistant_only(self) -> bool:
        """`assistant_only_loss`, or its default (true) when it was not given."""
        return DEFAULT_ASSISTANT_ONLY_LOSS if self.assistant_only_loss is None else self.assistant_only_loss

    def hub_dataset_id(self) -> str | None:
        """The Hub dataset id when the data comes from the Hub (not local files, a folder or the sample)."""
        if self.use_bundled_sample or self.data_files or os.path.isdir(self.dataset_name):
            return None
        return self.dataset_name

    def display_name(self) -> str:
        """A name for the data in cards and eval results: a Hub id, file names, or the bundled sample's name
        (never a local path)."""
        if self.use_bundled_sample:
            return "reso-hf guanaco sample"
        if self.data_files:
            return ", ".join(os.path.basename(path) for path in self.data_files)
        return os.path.basename(os.path.normpath(self.dataset_name)) if os.path.isdir(self.dataset_name) else self.dataset_name

    def source(self) -> str:
        if self.use_bundled_sample:
            return "bundled sample (reso_hf/data/guanaco_sample.jsonl)"
        return ", ".join(self.data_files) if self.data_files else self.dataset_name


@dataclass
class PretrainArguments(AuxiliaryLossArguments):
    """The model to pretrain, and the weights of the auxiliary losses (`AuxiliaryLossArguments`, all 0 by default)."""

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
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the run already in output_dir (its checkpoints, model/ and reports) by a new one."})

    def __post_init__(self):
        super().__post_init__()
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"model_preset must be one of {MODEL_PRESETS}, got {self.model_preset!r}")


@dataclass
class SftArguments:
    base_model: Optional[str] = field(default=None, metadata={
        "help": "Causal LM to fine-tune: Hub id, local folder, or a .gguf file (dequantised by transformers)."})
    gguf_file: Optional[str] = field(default=None, metadata={
        "help": "GGUF file name inside base_model (a folder or Hub repo); implied when base_model ends in .gguf."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the base model's own code (trusted repos only)."})
    train: str = field(default="dynamic_lora", metadata={
        "help": "What is trained: 'dynamic_lora' (a DynamicLoRA adapter, saved to adapter/), 'resonant' (only the "
                "resonant components of a converted ResoLLM, saved with the whole model to model/), "
                "'resonant+dynamic_lora' (both, the resonant components saved in adapter/) or 'full' (every "
                "parameter, model/).", "choices": list(TRAIN_MODES)})
    dynamic_lora: Optional[str] = field(default=None, metadata={
        "help": "JSON object of DynamicLoraConfig fields (a mapping in YAML), e.g. tiers, tier_ranks, target_modules."})
    resonant_learning_rate: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the resonant components (their own optimizer parameter group, same schedule) "
                "with --train resonant+dynamic_lora or resonant; default: learning_rate. The components start at "
                "their identity and move far at an adapter's rate (benchmarks/upcycle_quality.py)."})
    resume: bool = field(default=False, metadata={"help": "Resume exactly from the last complete checkpoint in output_dir."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace the run already in output_dir (its checkpoints, adapter/ or model/ and reports) by a new one."})
    early_exit_loss_scale: Optional[float] = field(default=None, metadata={
        "help": "Train a ResoLLM base with the LayerSkip per-layer early-exit losses of this scale (sets "
                "adaptive_depth.loss_scale; 0 turns them off); default: the base's own setting. README 'Adaptive depth'."})

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ArgumentError(f"train must be one of {list(TRAIN_MODES)}, got {self.train!r}", "train")
        if self.resonant_learning_rate is not None:
            if not self.trains_resonant():
                raise ArgumentError(f"resonant_learning_rate applies to --train resonant or resonant+dynamic_lora, "
                                    f"got --train {self.train}", "resonant_learning_rate")
            rate = self.resonant_learning_rate
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
                raise ArgumentError(f"resonant_learning_rate must be a finite number > 0, got {rate!r}",
                                    "resonant_learning_rate")
        scale = self.early_exit_loss_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0
                                  or scale == float("inf")):
            raise ArgumentError(f"early_exit_loss_scale must be a finite number >= 0, got {scale!r}",
                                "early_exit_loss_scale")

    def trains_adapter(self) -> bool:
        """Whether the run trains a DynamicLoRA adapter (saved to adapter/) rather than the model (model/)."""
        return self.train in ("dynamic_lora", "resonant+dynamic_lora")

    def trains_resonant(self) -> bool:
        """Whether the resonant components of a ResoLLM are trained (the base must be one that has them)."""
        return self.train in ("resonant", "resonant+dynamic_lora")


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
# Parsing


def load_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"recipe file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ArgumentError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from error
    except UnicodeDecodeError as error:
        raise ArgumentError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    if not isinstance(recipe, dict):
        raise ArgumentError(f"{path}: a recipe must be a YAML mapping of field: value, got {type(recipe).__name__}")
    return recipe


def argument_parser(dataclass_types, prog: str | None = None) -> HfArgumentParser:
    """HfArgumentParser that raises `ArgumentError` instead of printing the whole usage and exiting, and that
    takes no abbreviated flags (`--max_step` is not silently `--max_steps`)."""
    parser = HfArgumentParser(dataclass_types, prog=prog, allow_abbrev=False)

    def error(message):
        raise ArgumentError(message)

    parser.error = error
    return parser


def full_help(dataclass_types, prog: str) -> str:
    """Every field of the dataclasses with its type, default and help (argparse's help text)."""
    return argument_parser(dataclass_types, prog).format_help()


def _actions_by_field(parser) -> dict:
    return {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}


def recipe_to_argv(recipe: dict, dataclass_types, source: str = "recipe", parser=None) -> list[str]:
    """Turn a recipe mapping into CLI flags (so YAML values get exactly the CLI's type conversion).

    A list is accepted only by a field that takes several values, a mapping only by a text field (it is passed
    on as JSON); anything else is an `ArgumentError` naming `source` and the field.
    """
    actions = _actions_by_field(parser or argument_parser(dataclass_types))
    known = {f.name for cls in dataclass_types for f in fields(cls) if f.init}
    argv = []
    for key, value in recipe.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {close}?" if close else "; see --help-all for the allowed fields"
            raise ArgumentError(f"{source}: unknown field {key!r}{hint}")
        if value is None:
            raise ArgumentError(f"{source}: field {key!r} is null; omit it to keep its default")
        action = actions[key]
        takes_several = action.nargs in ("+", "*")
        if isinstance(value, list):
            if not takes_several:
                raise ArgumentError(f"{source}: field {key!r} takes one {_kind(action)}, got the list {value!r}")
            if any(isinstance(item, (list, dict)) for item in value):
                raise ArgumentError(f"{source}: field {key!r} takes a list of {_kind(action)}s, got {value!r}")
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            if action.type not in (None, str):
                raise ArgumentError(f"{source}: field {key!r} takes one {_kind(action)}, got the mapping {value!r}")
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _kind(action) -> str:
    if action.choices:
        return "of " + ", ".join(repr(choice) for choice in action.choices)
    names = {int: "integer", float: "number", str: "text value"}
    return names.get(action.type, "boolean" if action.nargs == "?" and action.const is True else "value")


_ARGPARSE_MESSAGE = re.compile(r"^argument --([\w]+)(?:/--[\w-]+)*: (.*)$", re.DOTALL)


def _from_recipe(message: str, source: str) -> str:
    """argparse's "argument --x/--x-y: problem" as "RECIPE: field 'x': problem"."""
    match = _ARGPARSE_MESSAGE.match(message)
    return f"{source}: field {match.group(1)!r}: {match.group(2)}" if match else f"{source}: {message}"


def _from_command_line(message: str) -> str:
    match = _ARGPARSE_MESSAGE.match(message)
    return f"--{match.group(1)}: {match.group(2)}" if match else message


def parse_recipe(dataclass_types, recipe_path: Optional[str], argv: list[str]) -> tuple:
    """Dataclasses from a YAML recipe (optional) overridden by CLI flags, with every value checked.

    Raises `ArgumentError` (unknown field or flag, wrong type, value out of range) naming the recipe file and
    field or the flag, and `FileNotFoundError` for a missing recipe."""
    parser = argument_parser(dataclass_types)
    recipe_argv = []
    if recipe_path:
        recipe_argv = recipe_to_argv(load_recipe(recipe_path), dataclass_types, recipe_path, parser)
        try:  # the recipe alone first, so that a bad value is reported as the recipe's
            parser.parse_known_args(recipe_argv)
        except ArgumentError as error:
            raise ArgumentError(_from_recipe(str(error), recipe_path)) from None
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=recipe_argv + list(argv),
                                                                return_remaining_strings=True)
    except ArgumentError as error:
        raise ArgumentError(_from_command_line(str(error))) from None
    if remaining:
        raise ArgumentError(_unknown_flags_message(remaining, parser))
    try:
        validate_values(parsed)
    except ArgumentError as error:
        flags = {item.split("=", 1)[0].lstrip("-").replace("-", "_") for item in argv if item.startswith("--")}
        if recipe_path and error.field_name in recipe_argv_fields(recipe_argv) and error.field_name not in flags:
            raise ArgumentError(f"{recipe_path}: {error}", error.field_name) from None
        raise
    return tuple(parsed)


def recipe_argv_fields(recipe_argv: list[str]) -> set[str]:
    return {item[2:] for item in recipe_argv if item.startswith("--")}


def _unknown_flags_message(remaining: list[str], parser) -> str:
    flag = next((item for item in remaining if item.startswith("-")), None)
    if flag is None:
        return f"unexpected value {remaining[0]!r} (a flag takes one value unless its help says several)"
    name = flag.split("=", 1)[0]
    options = [option for action in parser._actions for option in action.option_strings if "-" not in option[2:]]
    close = difflib.get_close_matches(name.replace("-", "_"), options, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; --help-all lists every flag"
    return f"unknown flag {name}{hint}"


# ----------------------------------------------------------------------------------------------------------
# Values


def _positive(value) -> bool:
    return value > 0


def _at_least_zero(value) -> bool:
    return value >= 0


def _unit_interval(value) -> bool:
    return 0 <= value < 1


# field -> (check, what is allowed): applied to every parsed dataclass that has the field and a value for it.
VALUE_RULES = {
    "learning_rate": (_at_least_zero, ">= 0"),
    "weight_decay": (_at_least_zero, ">= 0"),
    "adam_beta1": (_unit_interval, "in [0, 1)"),
    "adam_beta2": (_unit_interval, "in [0, 1)"),
    "adam_epsilon": (_at_least_zero, ">= 0"),
    "max_grad_norm": (_at_least_zero, ">= 0 (0 disables clipping)"),
    "label_smoothing_factor": (_unit_interval, "in [0, 1)"),
    "per_device_train_batch_size": (_positive, ">= 1"),
    "per_device_eval_batch_size": (_positive, ">= 1"),
    "gradient_accumulation_steps": (_positive, ">= 1"),
    "max_steps": (lambda value: value > 0 or value == -1, "> 0, or -1 to train num_train_epochs"),
    "save_total_limit": (_at_least_zero, ">= 0"),
    "dataloader_num_workers": (_at_least_zero, ">= 0"),
    "max_train_samples": (_positive, ">= 1"),
    "max_eval_samples": (_positive, ">= 1"),
    "tokenizer_vocab_size": (lambda value: value >= 259, ">= 259 (the 256 bytes and 3 special tokens)"),
    "vocab_size": (lambda value: value >= 259, ">= 259 (the 256 bytes and 3 special tokens)"),
    "min_frequency": (_positive, ">= 1"),
    "batch_size": (_positive, ">= 1"),
    "num_samples": (_at_least_zero, ">= 0"),
    "max_new_tokens": (_positive, ">= 1"),
}


def validate_values(parsed) -> None:
    """Range checks that `TrainingArguments` and our dataclasses do not make themselves (a negative learning
    rate would otherwise fail only when the optimizer is built, after the data and model are loaded)."""
    for arguments in parsed:
        for name, (check, allowed) in VALUE_RULES.items():
            value = getattr(arguments, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not check(value):
                raise ArgumentError(f"{name} must be {allowed}, got {value}", name)
        if getattr(arguments, "max_steps", 1) == -1 and getattr(arguments, "num_train_epochs", 1) <= 0:
            raise ArgumentError(f"num_train_epochs must be > 0 when max_steps is not set, got {arguments.num_train_epochs}",
                                "num_train_epochs")
        for name in ("save_steps", "eval_steps"):
            strategy = getattr(arguments, name.replace("_steps", "_strategy"), None)
            value = getattr(arguments, name, None)
            if getattr(strategy, "value", strategy) == "steps" and value is not None and value <= 0:
                raise ArgumentError(f"{name} must be > 0 with {name.replace('_steps', '_strategy')}=steps, got {value}",
                                    name)
        for name in ("config_overrides", "dynamic_lora"):
            if isinstance(getattr(arguments, name, None), str):
                try:
                    json_mapping(getattr(arguments, name), name)
                except ArgumentError as error:
                    raise ArgumentError(str(error), name) from None


def json_mapping(value, name: str) -> dict:
    """A JSON object given as a string (CLI) or already a dict."""
    if value is None:
        return {}
    try:
        mapping = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as error:
        raise ArgumentError(f"{name} must be a JSON object (a mapping in YAML): {error} in {value!r}") from None
    if not isinstance(mapping, dict):
        raise ArgumentError(f"{name} must be a JSON object (a mapping in YAML), got {mapping!r}")
    return mapping
