"""`reso-hf` command line: one subcommand per module, each exposing `add_parser(subparsers)`.

Each module's `add_parser` registers its subcommand(s) and sets `func` on the parser to a callable
taking the parsed `argparse.Namespace` and returning an exit code.
"""

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order they appear in `--help`.
COMMAND_MODULES = [
    "reso_hf.training.commands",
    "reso_hf.runtime.commands",
    "reso_hf.hub.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reso-hf", description="Reso-LLM and DynamicLoRA for Hugging Face.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
