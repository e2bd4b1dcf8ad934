"""Runtime on top of Hugging Face `generate`: the seed's inference API, multi-agent groups, chat."""

from .agents import STRATEGIES, ResoAgentGroup
from .chat import ChatSession
from .inference import GenerationResult, ResoLLMInference

__all__ = ["ResoLLMInference", "GenerationResult", "ResoAgentGroup", "STRATEGIES", "ChatSession"]
