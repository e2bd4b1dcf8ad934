"""ResoLLM: a pre-norm GQA decoder with prime token codes, resonant rotary spectra, causal Kuramoto
phase coupling and coherence gating (SPEC §3.1–§3.4), written in transformers' single-model-file style.

Self-contained: only relative imports among `reso_hf/modeling/` plus torch/transformers, because
`save_pretrained` copies this file into the checkpoint for `trust_remote_code=True` loading.
"""

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    eager_attention_forward,
    rotate_half,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_reso_llm import ResoLLMConfig
from .generation_reso_llm import ResoLLMGenerationMixin
from .resonance import (
    ResoLLMCoherenceGate,
    ResoLLMKuramoto,
    ResoLLMPrimeCode,
    prime_code_table,
    rotary_inverse_frequencies,
)


@dataclass
class ResoLLMModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    gates (`tuple(torch.FloatTensor)`, *optional*, returned with `output_gates=True`):
        Coherence gate values per layer, each (batch, seq_len).
    coherence (`tuple(torch.FloatTensor)`, *optional*, returned with `output_coherence=True`):
        Kuramoto order parameter r_t per layer, each (batch, num_key_value_heads, seq_len).
    """

    gates: tuple[torch.FloatTensor, ...] | None = None
    coherence: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ResoLLMCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    gates (`tuple(torch.FloatTensor)`, *optional*): see `ResoLLMModelOutputWithPast`.
    coherence (`tuple(torch.FloatTensor)`, *optional*): see `ResoLLMModelOutputWithPast`.
    """

    gates: tuple[torch.FloatTensor, ...] | None = None
    coherence: tuple[torch.FloatTensor, ...] | None = None


class ResoLLMRMSNorm(LlamaRMSNorm):
    pass


class ResoLLMMLP(LlamaMLP):
    pass


class ResoLLMRotaryEmbedding(nn.Module):
    """Positional rotary phases in rotate-half layout (pair j = dims j and j + head_dim/2).

    Without Kuramoto it returns full-width cos/sin exactly like Llama. With Kuramoto the last pair of
    every head is reserved for the content phase, so it returns the ``head_dim/2 - 1`` positional
    angles of one half; the attention completes each layer's full-width cos/sin.
    """

    def __init__(self, config: ResoLLMConfig):
        super().__init__()
        self.config = config
        self.reserve_content_pair = config.kuramoto
        self.inv_freq = nn.Buffer(self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: ResoLLMConfig) -> torch.Tensor:
        head_dim = config.resolved_head_dim
        num_pairs = head_dim // 2 - (1 if config.kuramoto else 0)
        return rotary_inverse_frequencies(config.rope_spectrum, num_pairs, head_dim, config.rope_theta)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
        angles = position_ids[..., None].float() * self.inv_freq.float()
        if not self.reserve_content_pair:
            angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def apply_rotary(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotation; cos/sin broadcast against ``states`` (B, H, T, D)."""
    return states * cos + rotate_half(states) * sin


class ResoLLMAttention(nn.Module):
    """Causal GQA attention through transformers' attention interface, with positional rotary phases
    and (when `config.kuramoto`) a content phase on the last rotary pair of each head: the score of
    query t and key s then gains a term in ``cos(theta'_t - theta'_s)``.
    """

    def __init__(self, config: ResoLLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.resolved_head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.kuramoto = (
            ResoLLMKuramoto(config.hidden_size, self.num_key_value_heads, config.kuramoto_coupling_init)
            if config.kuramoto
            else None
        )

    def _content_phases(self, hidden_states, token_mask, segment_starts, past_key_values):
        """cos/sin of the coupled Kuramoto phase per key/value head, (B, H_kv, T, 1) each."""
        phase_layer = self.config.num_hidden_layers + self.layer_idx
        previous_sum = previous_count = None
        if past_key_values is not None:
            cached = past_key_values.layers[phase_layer]
            if cached.is_initialized and cached.keys.shape[-2] > 0:
                # The cache layer stores values in the keys' (complex) dtype; the count is real.
                previous_sum, previous_count = cached.keys[:, :, -1:], cached.values[:, :, -1:].real
        content_cos, content_sin, _, phasor_sum, count = self.kuramoto(
            hidden_states, token_mask, previous_sum, previous_count, segment_starts
        )
        if past_key_values is not None:
            past_key_values.update(phasor_sum, count, phase_layer)
        return content_cos.unsqueeze(-1), content_sin.unsqueeze(-1)

    def _rotate(self, query_states, key_states, hidden_states, position_embeddings, token_mask, segment_starts,
                past_key_values):
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.kuramoto is None:
            return apply_rotary(query_states, cos, sin), apply_rotary(key_states, cos, sin)

        # Complete the positional half-angles with the content phase in the reserved last pair.
        content_cos, content_sin = self._content_phases(hidden_states, token_mask, segment_starts, past_key_values)
        shape = (content_cos.shape[0], self.num_key_value_heads, -1, -1)
        cos, sin = cos.expand(shape), sin.expand(shape)
        content_cos, content_sin = content_cos.to(cos.dtype), content_sin.to(sin.dtype)
        key_cos = torch.cat([cos, content_cos, cos, content_cos], dim=-1)
        key_sin = torch.cat([sin, content_sin, sin, content_sin], dim=-1)
        if self.num_key_value_groups == 1:
            query_cos, query_sin = key_cos, key_sin
        else:
            query_cos = key_cos.repeat_interleave(self.num_key_value_groups, dim=1)
            query_sin = key_sin.repeat_interleave(self.num_key_value_groups, dim=1)
        return apply_rotary(query_states, query_cos, query_sin), apply_rotary(key_states, key_cos, key_sin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        segment_starts: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        query_states, key_states = self._rotate(
            query_states, key_states, hidden_states, position_embeddings, token_mask, segment_starts, past_key_values
        )

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class ResoLLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: ResoLLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ResoLLMAttention(config, layer_idx)
        self.mlp = ResoLLMMLP(config)
        self.input_layernorm = ResoLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ResoLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.coherence_gate = (
            ResoLLMCoherenceGate(config.hidden_size, config.coherence_threshold, config.coherence_sharpness)
            if config.coherence_gating
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        segment_starts: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            token_mask=token_mask,
            segment_starts=segment_starts,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.coherence_gate is not None:
            hidden_states, _ = self.coherence_gate(hidden_states)
        return residual + hidden_states


def check_safetensors_file(path: str) -> None:
    """Raise OSError naming ``path`` if it is not a complete safetensors file (header + all tensor bytes)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise OSError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise OSError(f"{path} is truncated: header of {header_length} bytes but the file has {size} bytes")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise OSError(f"{path} is corrupt: its safetensors header is not valid JSON ({error})") from error
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    expected = 8 + header_length + data_end
    if size != expected:
        raise OSError(f"{path} is truncated or corrupt: expected {expected} bytes, found {size}")


def check_local_checkpoint(directory: str) -> None:
    """Validate the weights of a local checkpoint folder before transformers reads them."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise OSError(f"{directory} has no weights file {shard}: the checkpoint is incomplete")
        check_safetensors_file(shard_path)


class ResoLLMPreTrainedModel(PreTrainedModel):
    config: ResoLLMConfig
    config_class = ResoLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ResoLLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the Kuramoto cache layers are dynamic
    _can_record_outputs = {
        "hidden_states": ResoLLMDecoderLayer,
        "attentions": OutputRecorder(ResoLLMAttention, index=1),
        "gates": OutputRecorder(ResoLLMCoherenceGate, index=1),
        "coherence": OutputRecorder(ResoLLMKuramoto, index=2),
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            if kwargs.get("gguf_file") is None and kwargs.get("subfolder", "") == "":
                check_local_checkpoint(str(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # Non-persistent buffers are not in the checkpoint: recompute them whenever weights are initialised.
        if isinstance(module, ResoLLMPrimeCode):
            init.copy_(module.code_table, prime_code_table(module.vocab_size, module.code_dim))
        elif isinstance(module, ResoLLMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.config))
        elif isinstance(module, ResoLLMKuramoto):
            init.constant_(module.coupling, module.coupling_init)
        elif isinstance(module, ResoLLMCoherenceGate):
            init.constant_(module.score.bias, ResoLLMCoherenceGate.INITIAL_BIAS)


# v2 extensions whose computation is not in this version yet: enabling one is an error, never a no-op.
EXTENSIONS_NOT_YET_AVAILABLE = ("agency", "prsc", "temporal_smf")


def _check_extensions_available(config: ResoLLMConfig) -> None:
    for name in EXTENSIONS_NOT_YET_AVAILABLE:
        if getattr(config, name).enabled:
            raise ValueError(f"{name}.enabled=True is not supported by this version of reso-hf yet; set it to False")


def _check_token_ids(input_ids: torch.LongTensor, vocab_size: int):
    out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
    if out_of_range.any():
        bad = input_ids[out_of_range][0].item()
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size - 1}]")


class ResoLLMModel(ResoLLMPreTrainedModel):
    """The ResoLLM backbone: embeddings, decoder layers and final norm (returns hidden states)."""

    def __init__(self, config: ResoLLMConfig):
        super().__init__(config)
        _check_extensions_available(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.prime_code = (
            ResoLLMPrimeCode(config.vocab_size, config.prime_code_dim, config.hidden_size)
            if config.prime_embedding
            else None
        )
        self.layers = nn.ModuleList(
            [ResoLLMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = ResoLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ResoLLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _prepare_phase_cache(self, past_key_values: Cache):
        """Kuramoto keeps its running sums as extra cache layers after the attention layers."""
        if not isinstance(past_key_values, DynamicCache):
            raise ValueError(
                f"kuramoto=True needs a DynamicCache (the running phase sums live in it), got "
                f"{type(past_key_values).__name__}; use the default cache_implementation"
            )
        while len(past_key_values.layers) < 2 * self.config.num_hidden_layers:
            past_key_values.layers.append(DynamicLayer())

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ResoLLMModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_token_ids(input_ids, self.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
            if self.prime_code is not None:
                inputs_embeds = inputs_embeds + self.prime_code(input_ids)
        elif self.prime_code is not None:
            raise ValueError("prime_embedding=True needs input_ids (the prime code is indexed by token id)")

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if self.config.kuramoto and past_key_values is not None:
            self._prepare_phase_cache(past_key_values)

        seq_len = inputs_embeds.shape[1]
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens).unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        # Which of the new tokens are real (not padding): Kuramoto's mean field must ignore padding.
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:]
        else:
            token_mask = torch.ones(inputs_embeds.shape[:2], device=inputs_embeds.device)

        # Packed documents restart their position ids; Kuramoto's mean field restarts with them.
        segment_starts = None
        if self.config.kuramoto and seq_len > 1 and position_ids.shape[0] == inputs_embeds.shape[0]:
            starts = position_ids == 0
            if starts[:, 1:].any():
                segment_starts = starts

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                token_mask=token_mask,
                segment_starts=segment_starts,
                past_key_values=past_key_values,
                position_ids=position_ids,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return ResoLLMModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class ResoLLMForCausalLM(ResoLLMPreTrainedModel, ResoLLMGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ResoLLMConfig):
        super().__init__(config)
        self.model = ResoLLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def reset_state(self) -> None:
        """Forget all state that outlives a call (goals, bindings, memory, stability window)."""
        reset_generation_state = getattr(super(), "_reset_generation_state", None)
        if reset_generation_state is not None:
            reset_generation_state()

    def goal_telemetry(self, sequences: torch.LongTensor, prompt_length: int):
        """Per generated sequence: (descriptions of goals achieved, attention summary dict).

        Without active goals nothing can be achieved and there are no foci to summarise.
        """
        batch = sequences.shape[0]
        return [[] for _ in range(batch)], [{} for _ in range(batch)]

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ResoLLMCausalLMOutputWithPast:
        outputs: ResoLLMModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return ResoLLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gates=outputs.gates,
            coherence=outputs.coherence,
        )


__all__ = ["ResoLLMPreTrainedModel", "ResoLLMModel", "ResoLLMForCausalLM"]
