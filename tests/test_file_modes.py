"""Saved files get the mode the umask gives (safetensors >= 0.8 and mkstemp create 0600 files)."""

import json
import os
import stat

import pytest
import torch

import reso_hf
from reso_hf.dynamic_lora.serialization import atomic_save_safetensors, atomic_write_json, atomic_write_text

MICRO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             prime_code_dim=8, max_position_embeddings=64)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(directory):
    return {name: stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            for name in os.listdir(directory) if os.path.isfile(os.path.join(directory, name))}


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic_write_text(str(tmp_path / "a.txt"), "x")
    atomic_write_json(str(tmp_path / "b.json"), {"x": 1})
    atomic_save_safetensors(str(tmp_path / "c.safetensors"), {"x": torch.zeros(2)})
    assert modes(tmp_path) == {"a.txt": 0o666 & ~umask, "b.json": 0o666 & ~umask, "c.safetensors": 0o666 & ~umask}


def test_reso_llm_save_pretrained_with_memory_follows_the_umask(tmp_path, umask):
    tokenizer = reso_hf.create_default_tokenizer()
    model = reso_hf.ResoLLMForCausalLM(reso_hf.tiny_config(vocab_size=len(tokenizer), **MICRO))
    model.save_pretrained(tmp_path, save_memory=True)
    found = modes(tmp_path)
    assert {"model.safetensors", "config.json", "reso_state.safetensors", "reso_state.json"} <= set(found)
    assert set(found.values()) == {0o666 & ~umask}, found


def test_dynamic_lora_adapter_save_follows_the_umask(tmp_path, umask):
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(base, reso_hf.DynamicLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    found = modes(tmp_path)
    assert "adapter_model.safetensors" in found and "adapter_config.json" in found
    assert set(found.values()) == {0o666 & ~umask}, json.dumps({k: oct(v) for k, v in found.items()})
