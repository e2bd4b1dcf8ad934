"""The recipe commands of `reso-hf`: train, sft, eval, train-tokenizer, train-multimodal.

Each takes an optional YAML recipe first, then any field as a flag (flags win):

    reso-hf train recipes/reso_llm/pretrain_sample.yaml --max_steps 20
    reso-hf sft recipes/dynamic_lora/sft_guanaco.yaml --base_model HuggingFaceTB/SmolLM2-135M-Instruct
    reso-hf eval --model outputs/pretrain_sample/model --data held_out.jsonl
    reso-hf train-tokenizer --vocab_size 4096 --output_dir outputs/tokenizer --use_bundled_sample true

The flags are parsed by HfArgumentParser (`reso_hf.training.arguments`); the launcher (`reso_hf_cli`) hands
them over untouched and prints the short help of each command itself; `--help-all` lists every field.
"""

from __future__ import annotations

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


def _train(argv: list[str]) -> int:
    from .pretrain import main

    return main(*split_recipe_argument(argv))


def _sft(argv: list[str]) -> int:
    from .sft import main

    return main(*split_recipe_argument(argv))


def _eval(argv: list[str]) -> int:
    from .evaluate import main

    return main(*split_recipe_argument(argv))


@dataclass
class TokenizerArguments:
    vocab_size: int = field(default=4096, metadata={"help": "Size of the byte-level BPE (>= 259)."})
    output_dir: str = field(default="outputs/tokenizer", metadata={"help": "Folder for the tokenizer files."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a merge."})


def _tokenizer_argument_types() -> tuple:
    from .arguments import DataArguments

    return (TokenizerArguments, DataArguments)


def _train_tokenizer(argv: list[str]) -> int:
    from ..modeling.tokenization_reso_llm import train_tokenizer
    from .arguments import parse_recipe
    from .data import load_raw_splits

    recipe, rest = split_recipe_argument(argv)
    tokenizer_args, data_args = parse_recipe(_tokenizer_argument_types(), recipe, rest)
    train, _ = load_raw_splits(data_args)
    texts = (row[data_args.text_field] for row in train if isinstance(row[data_args.text_field], str))
    tokenizer = train_tokenizer(texts, tokenizer_args.vocab_size, min_frequency=tokenizer_args.min_frequency)
    tokenizer.save_pretrained(tokenizer_args.output_dir)
    print(f"Saved a {len(tokenizer)}-token ResoTokenizer to {tokenizer_args.output_dir}")
    return 0


def _train_multimodal(argv: list[str]) -> int:
    from ..multimodal.training import main

    return main(*split_recipe_argument(argv))


def _argument_types(name: str) -> tuple:
    from . import evaluate, pretrain, sft

    if name == "train-multimodal":
        from ..multimodal.training import ARGUMENT_TYPES

        return ARGUMENT_TYPES
    return {"train": pretrain.ARGUMENT_TYPES, "sft": sft.ARGUMENT_TYPES, "eval": evaluate.ARGUMENT_TYPES,
            "train-tokenizer": _tokenizer_argument_types()}[name]


COMMANDS = {"train": _train, "sft": _sft, "eval": _eval, "train-tokenizer": _train_tokenizer,
            "train-multimodal": _train_multimodal}


def run(name: str, argv: list[str]) -> int:
    """Run the recipe command `name` on its arguments; returns the exit code."""
    return int(COMMANDS[name](list(argv)) or 0)


def full_help(name: str) -> str:
    """The help of every field of command `name` (`reso-hf NAME --help-all`)."""
    from .arguments import full_help as dataclass_help

    text = dataclass_help(_argument_types(name), prog=f"reso-hf {name}")
    if name == "eval":
        text += "\n  --data FILE [FILE ...]\n                        Evaluate on every row of these local files.\n"
    return text
