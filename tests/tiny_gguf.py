"""A tiny random Llama, and a llama-architecture GGUF file written from it and a byte-level BPE tokenizer.

The layout follows what llama.cpp's converter writes and transformers' GGUF loader reads back
(`transformers/modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`, `integrations/gguf/`):
metadata under `llama.*`, the vocabulary under `tokenizer.ggml.*` (type "gpt2" = byte-level BPE),
tensors named by `gguf.get_tensor_name_map`, and the query/key projections permuted per head the
way llama.cpp stores them (transformers undoes it on load). Tensors are written as float32, so the
file round-trips exactly.
"""

import gguf
import numpy as np
import torch

CONTROL, NORMAL = 3, 1  # gguf.TokenType values


def llama_cpp_rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores each head's rotary halves interleaved: (heads, 2, d/2, ...) -> (heads, d/2, 2, ...)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_llama_gguf(path, model, tokenizer, name: str = "tiny-llama") -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert [index for _, index in vocabulary] == list(range(len(vocabulary))), "token ids must be contiguous"
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocabulary])
    writer.add_token_types([CONTROL if token in special else NORMAL for token, _ in vocabulary])
    writer.add_token_scores([0.0] * len(vocabulary))  # no merges: transformers derives them from the scores
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp omits output.weight when it is the embedding
    for key, tensor in state.items():
        array = tensor.detach().to(torch.float32).numpy()
        if key.endswith("self_attn.q_proj.weight"):
            array = llama_cpp_rotary_permute(array, config.num_attention_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            array = llama_cpp_rotary_permute(array, config.num_key_value_heads)
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {key}"
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(vocab_size: int, seed: int = 0, tie_word_embeddings: bool = False):
    """A random 2-layer Llama small enough to build, save and train in a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config).eval()
