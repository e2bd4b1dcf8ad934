"""Registration of ResoLLM with the transformers Auto classes (idempotent)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForImageTextToText,
    AutoModelForTokenClassification,
    AutoProcessor,
    AutoTokenizer,
)

from .dynamic_lora.serialization import apply_umask_mode_to_safetensors
from .modeling import (
    ResoLLMConfig,
    ResoLLMForCausalLM,
    ResoLLMForQuestionAnswering,
    ResoLLMForSequenceClassification,
    ResoLLMForTokenClassification,
    ResoLLMModel,
    ResoLLMPreTrainedModel,
)
from .modeling.configuration_reso_llm_multimodal import ResoLLMMultimodalConfig
from .modeling.modeling_reso_llm_multimodal import ResoLLMForConditionalGeneration, ResoLLMMultimodalPreTrainedModel
from .modeling.processing_reso_llm import ResoLLMProcessor
from .modeling.tokenization_reso_llm import ResoTokenizer

# Auto class -> ResoLLM class; each is registered and writes its `auto_map` entry when saved.
AUTO_CLASSES = {
    AutoModel: ResoLLMModel,
    AutoModelForCausalLM: ResoLLMForCausalLM,
    AutoModelForSequenceClassification: ResoLLMForSequenceClassification,
    AutoModelForTokenClassification: ResoLLMForTokenClassification,
    AutoModelForQuestionAnswering: ResoLLMForQuestionAnswering,
}


def register_reso_llm() -> None:
    """Make `reso_llm` known to AutoConfig, AutoTokenizer and the model Auto classes of `AUTO_CLASSES`, and mark the
    classes so that `save_pretrained` writes `auto_map` and copies their code into the checkpoint."""
    AutoConfig.register(ResoLLMConfig.model_type, ResoLLMConfig, exist_ok=True)
    for auto_class, model_class in AUTO_CLASSES.items():
        auto_class.register(ResoLLMConfig, model_class, exist_ok=True)
    AutoTokenizer.register(ResoLLMConfig, fast_tokenizer_class=ResoTokenizer, exist_ok=True)
    ResoLLMConfig.register_for_auto_class()
    for auto_class, model_class in AUTO_CLASSES.items():
        model_class.register_for_auto_class(auto_class.__name__)
    ResoTokenizer.register_for_auto_class("AutoTokenizer")
    if _weights_mode_save_hook not in ResoLLMPreTrainedModel._post_save_hooks:
        ResoLLMPreTrainedModel._post_save_hooks.append(_weights_mode_save_hook)
    register_reso_llm_multimodal()


def register_reso_llm_multimodal() -> None:
    """`reso_llm_multimodal` (issue 16): AutoConfig, AutoModelForImageTextToText (the task of LLaVA-style models
    that take images and text and write text; audio rides along) and AutoProcessor, with their `auto_map`."""
    AutoConfig.register(ResoLLMMultimodalConfig.model_type, ResoLLMMultimodalConfig, exist_ok=True)
    AutoModelForImageTextToText.register(ResoLLMMultimodalConfig, ResoLLMForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(ResoLLMMultimodalConfig, ResoLLMProcessor, exist_ok=True)
    AutoTokenizer.register(ResoLLMMultimodalConfig, fast_tokenizer_class=ResoTokenizer, exist_ok=True)
    ResoLLMMultimodalConfig.register_for_auto_class()
    ResoLLMForConditionalGeneration.register_for_auto_class(AutoModelForImageTextToText.__name__)
    ResoLLMProcessor.register_for_auto_class("AutoProcessor")
    if _weights_mode_save_hook not in ResoLLMMultimodalPreTrainedModel._post_save_hooks:
        ResoLLMMultimodalPreTrainedModel._post_save_hooks.append(_weights_mode_save_hook)


def _weights_mode_save_hook(model, save_directory) -> None:
    """The weights get the umask's mode like the other saved files (safetensors >= 0.8 writes them 0600)."""
    apply_umask_mode_to_safetensors(str(save_directory))
