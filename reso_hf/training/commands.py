"""`reso-hf train | sft | eval | train-tokenizer`.

`train` and `sft` take an optional YAML recipe first, then any field as a flag (flags win):

    reso-hf train recipes/reso_llm/pretrain_sample.yaml --max_steps 20
    reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model HuggingFaceTB/SmolLM2-135M-Instruct
    reso-hf eval --model outputs/pretrain_sample/model --data held_out.jsonl
    reso-hf train-tokenizer --vocab_size 4096 --output_dir outputs/tokenizer --use_bundled_sample true

`--help` after a subcommand lists every field. The flags are parsed by HfArgumentParser, so the
subcommands hand their arguments over untouched (`prefix_chars="+"` keeps argparse off them).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field


def split_recipe_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """(recipe path or None, the remaining flags) from `RECIPE.yaml ...` or `--recipe RECIPE.yaml ...`."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    if "--recipe" in argv:
        index = argv.index("--recipe")
        if index + 1 >= len(argv):
            raise ValueError("--recipe needs a YAML file path")
        return argv[index + 1], argv[:index] + argv[index + 2:]
    return None, argv


def _train(args) -> int:
    from .pretrain import main

    return main(*split_recipe_argument(args.args))


def _sft(args) -> int:
    from .sft import main

    return main(*split_recipe_argument(args.args))


def _eval(args) -> int:
    from .evaluate import main

    return main(*split_recipe_argument(args.args))


@dataclass
class TokenizerArguments:
    vocab_size: int = field(default=4096, metadata={"help": "Size of the byte-level BPE (>= 259)."})
    output_dir: str = field(default="outputs/tokenizer", metadata={"help": "Folder for the tokenizer files."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})


def _train_tokenizer(args) -> int:
    from ..modeling.tokenization_reso_llm import train_tokenizer
    from .arguments import DataArguments, parse_recipe
    from .data import load_raw_splits

    recipe, rest = split_recipe_argument(args.args)
    tokenizer_args, data_args = parse_recipe((TokenizerArguments, DataArguments), recipe, rest)
    train, _ = load_raw_splits(data_args)
    texts = (row[data_args.text_field] for row in train if isinstance(row[data_args.text_field], str))
    tokenizer = train_tokenizer(texts, tokenizer_args.vocab_size, min_frequency=tokenizer_args.min_frequency)
    tokenizer.save_pretrained(tokenizer_args.output_dir)
    print(f"Saved a {len(tokenizer)}-token ResoTokenizer to {tokenizer_args.output_dir}")
    return 0


COMMANDS = {
    "train": (_train, "Pretrain a ResoLLM from scratch (YAML recipe + flags)."),
    "sft": (_sft, "DynamicLoRA supervised fine-tuning of any causal LM (YAML recipe + flags)."),
    "eval": (_eval, "Held-out loss, perplexity and generation samples; writes eval_results.json."),
    "train-tokenizer": (_train_tokenizer, "Train a byte-level BPE ResoTokenizer on guanaco-format data."),
}


def add_parser(subparsers) -> None:
    for name, (func, help_text) in COMMANDS.items():
        parser = subparsers.add_parser(name, help=help_text, description=help_text, add_help=False, prefix_chars="+")
        parser.add_argument("args", nargs="*", help="[RECIPE.yaml] --field value ... (--help lists the fields)")
        parser.set_defaults(func=func)
