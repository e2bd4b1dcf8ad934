"""Tiny random models and configs shared by the DynamicLoRA tests (nothing is downloaded)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import reso_hf  # noqa: E402,F401  (registers DYNAMIC_LORA)
from reso_hf.dynamic_lora import DynamicLoraConfig  # noqa: E402

SMALL_RANKS = {"foundation": 8, "domain": 4, "swarm": 4, "agent": 2, "context": 2}
VOCAB = 101


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def small_config(**overrides) -> DynamicLoraConfig:
    values = dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], tier_ranks=dict(SMALL_RANKS))
    values.update(overrides)
    return DynamicLoraConfig(**values)


def batch(seed: int = 0, size: int = 2, length: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (size, length), generator=generator)


