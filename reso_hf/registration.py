"""Registration of ResoLLM with the transformers Auto classes (idempotent)."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .dynamic_lora.serialization import apply_umask_mode_to_safetensors
from .modeling import ResoLLMConfig, ResoLLMForCausalLM, ResoLLMModel, ResoLLMPreTrainedModel
from .modeling.tokenization_reso_llm import ResoTokenizer


def register_reso_llm() -> None:
    """Make `reso_llm` known to AutoConfig/AutoModel/AutoModelForCausalLM/AutoTokenizer, and mark the
    classes so that `save_pretrained` writes `auto_map` and copies their code into the checkpoint."""
    AutoConfig.register(ResoLLMConfig.model_type, ResoLLMConfig, exist_ok=True)
    AutoModel.register(ResoLLMConfig, ResoLLMModel, exist_ok=True)
    AutoModelForCausalLM.register(ResoLLMConfig, ResoLLMForCausalLM, exist_ok=True)
    AutoTokenizer.register(ResoLLMConfig, fast_tokenizer_class=ResoTokenizer, exist_ok=True)
    ResoLLMConfig.register_for_auto_class()
    ResoLLMModel.register_for_auto_class("AutoModel")
    ResoLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    ResoTokenizer.register_for_auto_class("AutoTokenizer")
    if _weights_mode_save_hook not in ResoLLMPreTrainedModel._post_save_hooks:
        ResoLLMPreTrainedModel._post_save_hooks.append(_weights_mode_save_hook)


def _weights_mode_save_hook(model, save_directory) -> None:
    """The weights get the umask's mode like the other saved files (safetensors >= 0.8 writes them 0600)."""
    apply_umask_mode_to_safetensors(str(save_directory))
