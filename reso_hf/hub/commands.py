"""`reso-hf card DIR` and `reso-hf push DIR --repo user/name [--private] [--dry-run]`."""

from __future__ import annotations

import sys


def _card_options(args) -> dict:
    options = {"license": args.license}
    if args.base_model:
        options["base_model"] = args.base_model
    if args.model_name:
        options["model_name"] = args.model_name
    if args.dataset:
        options["datasets"] = list(args.dataset)
    return options


def run_card(args) -> int:
    from .cards import CardError, write_card

    try:
        path = write_card(args.folder, repo_id=args.repo, **_card_options(args))
    except CardError as error:
        print(f"reso-hf card: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {path}")
    return 0


def run_push(args) -> int:
    from .cards import CardError
    from .push import PushError, push_to_hub_folder

    try:
        plan = push_to_hub_folder(
            args.folder, args.repo, private=args.private, dry_run=args.dry_run, token=args.token,
            commit_message=args.commit_message, include_training_state=args.include_training_state,
            include_private=args.include_private, keep_card=args.keep_card, card_options=_card_options(args),
        )
    except (PushError, CardError) as error:
        print(f"reso-hf push: error: {error}", file=sys.stderr)
        return 2
    print(plan.describe(dry_run=args.dry_run))
    return 0


def _card_arguments(parser) -> None:
    parser.add_argument("folder", help="folder written by save_pretrained (model or adapter)")
    parser.add_argument("--license", default="apache-2.0", help="Hub license id for the card (default apache-2.0)")
    parser.add_argument("--base_model", "--base-model", default=None,
                        help="Hub id of the base model (adapters; default: adapter_config.json)")
    parser.add_argument("--model_name", "--model-name", default=None, help="title of the card (default: repo or folder name)")
    parser.add_argument("--dataset", action="append", default=None,
                        help="Hub id of a training dataset for the card metadata (repeatable)")


def add_parser(subparsers) -> None:
    card = subparsers.add_parser(
        "card", help="(re)render README.md (model or adapter card) of a saved folder",
        description="Render the model/adapter card from the folder's config, run_summary.json and eval_results.json.")
    _card_arguments(card)
    card.add_argument("--repo", default=None, help="Hub repo id used in the card's loading example")
    card.set_defaults(func=run_card)

    push = subparsers.add_parser(
        "push", help="upload a saved folder to the Hub (public files only; --dry-run lists them)",
        description="Render the card, select the public files and upload them with huggingface_hub.")
    _card_arguments(push)
    push.add_argument("--repo", required=True, help="target repo id, user/name")
    push.add_argument("--private", action="store_true", help="create the repo as private")
    push.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print exactly the files (with sizes) that would be uploaded; no network, no writes")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in token)")
    push.add_argument("--commit_message", "--commit-message", default=None, help="commit message")
    push.add_argument("--include_training_state", "--include-training-state", action="store_true",
                      help="also upload the DynamicLoRA dynamics state and audit log, and saved ResoLLM memory (reso_state.*)")
    push.add_argument("--include_private", "--include-private", action="store_true",
                      help="allow weights of tiers marked private")
    push.add_argument("--keep_card", "--keep-card", action="store_true",
                      help="upload the existing README.md instead of re-rendering it")
    push.set_defaults(func=run_push)
