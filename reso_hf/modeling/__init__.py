"""The self-contained wing: everything a checkpoint needs to load with trust_remote_code=True."""

from .configuration_reso_llm import (
    AdaptiveDepthConfig,
    AgencyConfig,
    EntanglementConfig,
    GroupAttentionConfig,
    PRSCConfig,
    ResoLLMConfig,
    StabilityConfig,
    StochasticResonanceConfig,
    TemporalSMFConfig,
    large_config,
    medium_config,
    multi_agent_config,
    small_config,
    tiny_config,
)
from .modeling_reso_llm import (
    ResoLLMForCausalLM,
    ResoLLMForQuestionAnswering,
    ResoLLMForSequenceClassification,
    ResoLLMForTokenClassification,
    ResoLLMModel,
    ResoLLMPreTrainedModel,
)
from .configuration_reso_llm_multimodal import ResoLLMMultimodalConfig
from .modeling_reso_llm_multimodal import ResoLLMForConditionalGeneration, info_nce_loss
from .processing_reso_llm import ResoLLMProcessor, create_multimodal_tokenizer
