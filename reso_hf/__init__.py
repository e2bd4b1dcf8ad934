"""reso-hf: the Reso-LLM resonant language model and the DynamicLoRA adapter for Hugging Face.

Importing this package registers ResoLLM with the transformers Auto classes and DynamicLoRA as a
PEFT method.
"""

__version__ = "0.1.0"

from .modeling import (
    AdaptiveDepthConfig,
    AgencyConfig,
    EntanglementConfig,
    GroupAttentionConfig,
    PRSCConfig,
    ResoLLMConfig,
    ResoLLMForCausalLM,
    ResoLLMForQuestionAnswering,
    ResoLLMForSequenceClassification,
    ResoLLMForTokenClassification,
    ResoLLMModel,
    ResoLLMPreTrainedModel,
    StabilityConfig,
    StochasticResonanceConfig,
    TemporalSMFConfig,
    large_config,
    medium_config,
    multi_agent_config,
    small_config,
    tiny_config,
)
from .modeling import ResoLLMForConditionalGeneration, ResoLLMMultimodalConfig, ResoLLMProcessor
from .registration import register_reso_llm
from .tokenization import GUANACO_CHAT_TEMPLATE, ResoTokenizer, create_default_tokenizer, train_tokenizer

register_reso_llm()

# Generation telemetry and the seed's runtime API (SPEC §3.8–§3.11).
from .modeling.generation_reso_llm import ResoGenerateOutput, StabilityMonitor, StochasticResonanceLogitsProcessor
from .runtime import GenerationResult, ResoAgentGroup, ResoLLMInference

# DynamicLoRA PEFT tuner: importing the subpackage registers the "DYNAMIC_LORA" PEFT method (idempotent).
from .dynamic_lora import DynamicLoraCallback, DynamicLoraConfig, DynamicLoraModel, register_dynamic_lora

register_dynamic_lora()

# The phi learning-rate schedule: `TrainingArguments(lr_scheduler_type="phi")` (issue 17).
from .training.schedules import register_phi_schedule

register_phi_schedule()

# Hub sharing (SPEC §7): model/adapter cards and push; importing it installs the card-writing save hooks.
# The indexed SMF memory (issue 15): registers temporal_smf.store="indexed"; faiss/networkx load only when used.
from .memory.backend import IndexedSMFMemory, open_memory_store
from .memory.store import IndexedMemoryStore


def verify_statement(model, statement, evidence=None, k=None, tokenizer=None) -> dict:
    """Fact verification of ``statement`` with ``model``: see `ResoLLMForCausalLM.verify_statement`."""
    return model.verify_statement(statement, evidence=evidence, k=k, tokenizer=tokenizer)


from .hub import push_to_hub_folder, render_adapter_card, render_model_card, write_card
