"""The self-contained wing: everything a checkpoint needs to load with trust_remote_code=True."""

from .configuration_reso_llm import (
    AdaptiveDepthConfig,
    AgencyConfig,
    EntanglementConfig,
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
