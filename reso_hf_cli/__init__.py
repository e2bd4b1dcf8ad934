"""`reso-hf`: the command line launcher.

It lives outside the `reso_hf` package on purpose: importing `reso_hf` registers ResoLLM with transformers and
DynamicLoRA with PEFT, which imports torch (seconds). The launcher answers `reso-hf --help` and the short
`reso-hf COMMAND --help` of the recipe commands with the standard library only, and imports a command's
module when that command runs (or for `--help-all`).

Errors a user can fix (a bad recipe field or flag, a missing file or folder, bad data: `ValueError` and
`OSError`) are printed as `reso-hf COMMAND: error: <message>` plus one line saying how to get the traceback,
with exit status 2. `--debug` anywhere on the command line, or `RESO_HF_DEBUG=1`, shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

DEBUG_ENVIRONMENT = "RESO_HF_DEBUG"
USAGE_ERROR = 2
# Values of TrainingArguments' own `--debug` option: `--debug underflow_overflow` is theirs, a bare `--debug` ours.
TRAINING_DEBUG_OPTIONS = ("underflow_overflow", "tpu_metrics_debug")


@dataclass(frozen=True)
class Command:
    module: str  # imported only when the command runs
    summary: str  # one line, in `reso-hf --help`
    short_help: str | None = None  # recipe commands: printed by `reso-hf COMMAND --help` without importing

    @property
    def takes_a_recipe(self) -> bool:
        return self.short_help is not None


RECIPE_COMMON = """
A YAML recipe of field: value pairs may come first; every field is also a flag, and flags win over the recipe.
Booleans take true/false (a bare --flag means true).
"""

TRAIN_HELP = """usage: reso-hf train [RECIPE.yaml] [--FIELD VALUE ...]

Pretrain a ResoLLM from scratch on guanaco-format data.
""" + RECIPE_COMMON + """
common fields:
  --output_dir DIR              checkpoint-N/, model/, run_summary.json, loss_curves.png go here
  --model_preset NAME           tiny, small, medium or large
  --config_overrides JSON       ResoLLMConfig fields overriding the preset
  --data_files FILE [FILE ...]  local jsonl/parquet/arrow files with a guanaco `text` column
  --eval_data_files FILE ...    local evaluation files (default: eval_fraction of the training rows)
  --use_bundled_sample true     the 121-row sample shipped with reso-hf (offline)
  --block_size N                tokens per packed training row
  --max_steps N                 optimizer steps (or --num_train_epochs N)
  --learning_rate LR            peak learning rate
  --per_device_train_batch_size N
  --seed N                      seed of the run
  --lr_scheduler_type NAME      linear, cosine, ... or phi (warm-up, then phi-decay restarts)
  --resonance_loss_weight W     auxiliary losses (also --coherence_loss_weight, --holographic_loss_weight; 0 = off)
  --resume                      continue exactly from the last checkpoint in output_dir
  --overwrite_output_dir        replace the run already in output_dir

examples:
  reso-hf train recipes/reso_llm/pretrain_sample.yaml
  reso-hf train recipes/reso_llm/pretrain_sample.yaml --max_steps 20 --output_dir outputs/short

reso-hf train --help-all lists every field (with transformers.TrainingArguments').
"""

SFT_HELP = """usage: reso-hf sft [RECIPE.yaml] --base_model MODEL [--FIELD VALUE ...]

DynamicLoRA supervised fine-tuning of a causal LM on guanaco-format data.
""" + RECIPE_COMMON + """
common fields:
  --base_model MODEL            Hub id, local folder or .gguf file
  --train MODE                  dynamic_lora (default), resonant, resonant+dynamic_lora or full
  --dynamic_lora JSON           DynamicLoraConfig fields (tiers, tier_ranks, target_modules, ...)
  --output_dir DIR              checkpoint-N/, adapter/, run_summary.json and plots go here
  --data_files FILE [FILE ...]  local jsonl/parquet/arrow files with a guanaco `text` column
  --use_bundled_sample true     the 121-row sample shipped with reso-hf (offline)
  --chat_template NAME          auto, model or guanaco
  --max_steps N                 optimizer steps (or --num_train_epochs N)
  --learning_rate LR            peak learning rate
  --seed N                      seed of the run
  --resume                      continue exactly from the last checkpoint in output_dir
  --overwrite_output_dir        replace the run already in output_dir

example:
  reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model HuggingFaceTB/SmolLM2-135M-Instruct

reso-hf sft --help-all lists every field (with transformers.TrainingArguments').
"""

EVAL_HELP = """usage: reso-hf eval --model DIR [--data FILE ...] [RECIPE.yaml] [--FIELD VALUE ...]

Held-out loss, perplexity and greedy samples of a saved model; writes eval_results.json (and refreshes the
model card when written into the model folder).

common fields:
  --model DIR                   model folder (or Hub id) to evaluate
  --data FILE [FILE ...]        evaluate on every row of these local files
  --eval_data_files FILE ...    or: the eval files of a data recipe
  --assistant_only_loss BOOL    default: what the model was trained with (its run_summary.json), else true
  --output_file PATH            default: <model>/eval_results.json
  --num_samples N               greedy generation samples to write
  --block_size N                tokens per evaluation block

example:
  reso-hf eval --model outputs/pretrain_sample/model --data held_out.jsonl

reso-hf eval --help-all lists every field.
"""

TOKENIZER_HELP = """usage: reso-hf train-tokenizer [RECIPE.yaml] [--FIELD VALUE ...]

Train a byte-level BPE ResoTokenizer on guanaco-format data.

common fields:
  --vocab_size N                size of the vocabulary (>= 259)
  --output_dir DIR              folder for the tokenizer files
  --data_files FILE [FILE ...]  local jsonl/parquet/arrow files with a guanaco `text` column
  --use_bundled_sample true     the 121-row sample shipped with reso-hf (offline)

example:
  reso-hf train-tokenizer --vocab_size 4096 --use_bundled_sample true --output_dir outputs/tokenizer

reso-hf train-tokenizer --help-all lists every field.
"""

MULTIMODAL_HELP = """usage: reso-hf train-multimodal [RECIPE.yaml] [--FIELD VALUE ...]

Train a ResoLLM with a vision tower and a log-mel audio encoder on scikit-learn's digits and generated DTMF tones:
contrastive alignment (InfoNCE), then captioning; evaluates zero-shot accuracy, retrieval P@1 and captions.
""" + RECIPE_COMMON + """
common fields:
  --output_dir DIR              model/, run_summary.json, loss_curves.png go here
  --prime_codes BOOL            prime token codes + modality prime bands (false: the same-size ablation)
  --contrastive_steps N         stage 1 steps
  --captioning_steps N          stage 2 steps
  --batch_size N                images (and clips) per step
  --learning_rate LR            peak AdamW learning rate
  --vision_tower PATH           a pretrained vision tower (folder or Hub id) instead of the tiny random one
  --audio_tower PATH            a pretrained Whisper model or encoder instead of the tiny random one
  --eval_split NAME             dev or test
  --seed N                      seed of splits, initialisation and batches

example:
  reso-hf train-multimodal recipes/multimodal/digits_dtmf.yaml

reso-hf train-multimodal --help-all lists every field.
"""

COMMANDS = {
    "train": Command("reso_hf.training.commands", "Pretrain a ResoLLM from scratch (YAML recipe + flags).",
                     TRAIN_HELP),
    "sft": Command("reso_hf.training.commands", "DynamicLoRA fine-tuning of any causal LM (YAML recipe + flags).",
                   SFT_HELP),
    "eval": Command("reso_hf.training.commands", "Held-out loss, perplexity and samples; writes eval_results.json.",
                    EVAL_HELP),
    "train-tokenizer": Command("reso_hf.training.commands", "Train a byte-level BPE ResoTokenizer.", TOKENIZER_HELP),
    "train-multimodal": Command("reso_hf.training.commands",
                                "Train the image + audio ResoLLM on digits and DTMF tones (YAML recipe + flags).",
                                MULTIMODAL_HELP),
    "convert": Command("reso_hf.conversion", "Convert a Llama-family model into a ResoLLM computing the same function."),
    "chat": Command("reso_hf.runtime.commands", "Interactive chat with a saved model."),
    "generate": Command("reso_hf.runtime.commands", "Generate a continuation of --prompt."),
    "card": Command("reso_hf.hub.commands", "(Re)render the model or adapter card (README.md) of a saved folder."),
    "viz": Command("reso_hf.visualization.commands",
                   "Write PNGs: geometric activations, coherence field r_t (layer x position), phase trajectories."),
    "push": Command("reso_hf.hub.commands", "Upload a saved folder to the Hub (public files only; --dry-run lists them)."),
}


def top_level_parser() -> argparse.ArgumentParser:
    """`reso-hf --help`: the commands and their one-line summaries; builds no command's own parser."""
    parser = argparse.ArgumentParser(
        prog="reso-hf", description="Reso-LLM and DynamicLoRA for Hugging Face.",
        epilog="`reso-hf COMMAND --help` describes a command. --debug (or RESO_HF_DEBUG=1) shows the traceback "
               "of an error.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        subparsers.add_parser(name, help=command.summary, add_help=False)
    return parser


def pop_debug_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """(whether a bare `--debug` was given, argv without it); `--debug OPTION` stays for TrainingArguments."""
    kept, debug = [], False
    for index, item in enumerate(argv):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if item == "--debug" and following not in TRAINING_DEBUG_OPTIONS:
            debug = True
        else:
            kept.append(item)
    return debug, kept


def debug_from_environment() -> bool:
    return os.environ.get(DEBUG_ENVIRONMENT, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    debug, argv = pop_debug_flag(list(sys.argv[1:] if argv is None else argv))
    debug = debug or debug_from_environment()
    if not argv or argv[0] not in COMMANDS:
        top_level_parser().parse_args(argv)  # prints the help, or the usage error, and exits
        return USAGE_ERROR
    name, rest = argv[0], argv[1:]
    command = COMMANDS[name]
    if command.takes_a_recipe and any(item in ("-h", "--help") for item in rest):
        print(command.short_help, end="")
        return 0
    try:
        return run(name, rest)
    except (ValueError, OSError) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"reso-hf {name}: error: {message}", file=sys.stderr)
        print(f"(reso-hf --debug {name} ..., or {DEBUG_ENVIRONMENT}=1, shows the traceback)", file=sys.stderr)
        return USAGE_ERROR


def run(name: str, argv: list[str]) -> int:
    """Run command `name`: recipe commands through `reso_hf.training.commands`, the others through the
    argparse parser that their module adds with `add_parser(subparsers)`."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    if command.takes_a_recipe:
        if "--help-all" in argv:
            print(module.full_help(name), end="")
            return 0
        return module.run(name, argv)
    parser = argparse.ArgumentParser(prog="reso-hf")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    arguments = parser.parse_args([name, *argv])
    return int(arguments.func(arguments) or 0)
