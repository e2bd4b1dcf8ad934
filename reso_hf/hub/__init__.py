"""Hub sharing: model and adapter cards from `hub_cards/` templates, and `push` of public files only.

Importing this package registers the card writers as post-save hooks of `ResoLLMPreTrainedModel` and
`DynamicLoraConfig` (idempotent): `save_pretrained` then writes README.md whenever training metadata
(run_summary.json / eval_results.json in the folder, or `model.hub_card_metadata`) is available.
"""

from ..dynamic_lora.config import DynamicLoraConfig
from ..modeling.modeling_reso_llm import ResoLLMPreTrainedModel
from .cards import (
    EVAL_RESULTS_NAME,
    EVAL_RESULTS_SCHEMA,
    RUN_SUMMARY_NAME,
    RUN_SUMMARY_SCHEMA,
    CardError,
    adapter_card_save_hook,
    load_eval_results,
    load_run_summary,
    model_card_save_hook,
    render_adapter_card,
    render_card,
    render_model_card,
    validate_card_metadata,
    validate_eval_results,
    write_card,
)
from .push import PushError, PushPlan, push_to_hub_folder, select_files


def install_card_hooks() -> None:
    if model_card_save_hook not in ResoLLMPreTrainedModel._post_save_hooks:
        ResoLLMPreTrainedModel._post_save_hooks.append(model_card_save_hook)
    if adapter_card_save_hook not in DynamicLoraConfig._post_save_hooks:
        DynamicLoraConfig._post_save_hooks.append(adapter_card_save_hook)


install_card_hooks()

__all__ = [
    "EVAL_RESULTS_NAME", "EVAL_RESULTS_SCHEMA", "RUN_SUMMARY_NAME", "RUN_SUMMARY_SCHEMA", "CardError", "PushError",
    "PushPlan", "install_card_hooks", "load_eval_results", "load_run_summary", "push_to_hub_folder",
    "render_adapter_card", "render_card", "render_model_card", "select_files", "validate_card_metadata",
    "validate_eval_results", "write_card",
]
