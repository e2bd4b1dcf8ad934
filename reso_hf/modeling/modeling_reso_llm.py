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
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
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
from .crystalline import (
    PHI_HARMONIC_PROJECTIONS,
    PLATONIC_SOLIDS,
    RESIDUAL_WRITERS,
    ResoLLMGeometricActivation,
    phi_harmonic_std,
)
from .generation_reso_llm import ResoLLMGenerationMixin, entropy_of_scores
from .group_attention import GroupAttentionMask, ResoLLMPrimeSelection, candidate_primes, create_group_attention_mask
from .primes import first_primes
from .resonance import (
    ResoLLMConceptBank,
    ResoLLMCoherenceGate,
    ResoLLMKuramoto,
    ResoLLMPrimeCode,
    ResoLLMTokenEmbedding,
    prime_code_table,
    prime_phasor,
    rotary_inverse_frequencies,
)
from .state_reso_llm import (
    SMF_AXES,
    STATE_JSON_FILE,
    AttentionFocus,
    ConceptBinding,
    Goal,
    MemoryEntry,
    ResoState,
)


@dataclass
class ResoLLMModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    gates (`tuple(torch.FloatTensor)`, *optional*, returned with `output_gates=True`):
        Coherence gate values per layer, each (batch, seq_len).
    coherence (`tuple(torch.FloatTensor)`, *optional*, returned with `output_coherence=True`):
        Kuramoto order parameter r_t per layer, each (batch, num_key_value_heads, seq_len).
    exit_layers (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*, with early exit):
        Decoder layers each token ran (`num_hidden_layers` for a token that did not exit).
    exit_logits (`torch.FloatTensor` of shape `(batch, seq_len, vocab_size)`, *optional*, with early exit):
        The head's logits at each token's exit layer (undefined where it did not exit).
    """

    gates: tuple[torch.FloatTensor, ...] | None = None
    coherence: tuple[torch.FloatTensor, ...] | None = None
    exit_layers: torch.LongTensor | None = None
    exit_logits: torch.FloatTensor | None = None


@dataclass
class ResoLLMCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    gates (`tuple(torch.FloatTensor)`, *optional*): see `ResoLLMModelOutputWithPast`.
    coherence (`tuple(torch.FloatTensor)`, *optional*): see `ResoLLMModelOutputWithPast`.
    exit_layers (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): see `ResoLLMModelOutputWithPast`.
    layer_losses (`torch.FloatTensor` of shape `(num_hidden_layers,)`, *optional*, in training with labels and
        `adaptive_depth.loss_scale > 0`): the language-model loss of each layer's exit (0 for layers that have none).
    """

    gates: tuple[torch.FloatTensor, ...] | None = None
    coherence: tuple[torch.FloatTensor, ...] | None = None
    exit_layers: torch.LongTensor | None = None
    layer_losses: torch.FloatTensor | None = None


class ResoLLMRMSNorm(LlamaRMSNorm):
    pass


class ResoLLMMLP(LlamaMLP):
    """Llama's gated MLP, down(act(gate(x)) * up(x)); `hidden_act` may also name a Platonic solid, whose geometric
    activation (`ResoLLMGeometricActivation`) then takes SiLU's place on the gate."""

    def __init__(self, config: ResoLLMConfig):
        nn.Module.__init__(self)  # LlamaMLP's own __init__ looks hidden_act up in ACT2FN, which has no solids
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.mlp_bias)
        if config.hidden_act in PLATONIC_SOLIDS:
            self.act_fn = ResoLLMGeometricActivation(config.hidden_act, config.intermediate_size)
        else:
            self.act_fn = ACT2FN[config.hidden_act]


def positional_pairs(config: ResoLLMConfig) -> int:
    """Rotary pairs that carry a positional angle: all of them, except Kuramoto's reserved last pair unless
    `kuramoto_keeps_position` adds the content phase to that pair's positional angle."""
    reserved = config.kuramoto and not config.kuramoto_keeps_position
    return config.resolved_head_dim // 2 - (1 if reserved else 0)


class ResoLLMRotaryEmbedding(nn.Module):
    """Positional rotary phases in rotate-half layout (pair j = dims j and j + head_dim/2).

    Without Kuramoto it returns full-width cos/sin exactly like Llama, including RoPE scaling
    (`config.rope_parameters`: linear, dynamic, yarn, llama3, ... through transformers' own functions). With
    Kuramoto the last pair of every head is reserved for the content phase, so it returns the
    ``head_dim/2 - 1`` positional angles of one half (all ``head_dim/2`` with `kuramoto_keeps_position`); the
    attention completes each layer's full-width cos/sin.
    """

    def __init__(self, config: ResoLLMConfig):
        super().__init__()
        self.config = config
        self.reserve_content_pair = config.kuramoto
        self.num_pairs = positional_pairs(config)
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_inv_freq(config: ResoLLMConfig) -> tuple[torch.Tensor, float]:
        """(inverse frequencies of the positional pairs, attention scaling of the RoPE type)."""
        head_dim = config.resolved_head_dim
        num_pairs = positional_pairs(config)
        rope_type = config.rope_parameters["rope_type"]
        if config.rope_spectrum == "golden" or rope_type == "default":
            return rotary_inverse_frequencies(config.rope_spectrum, num_pairs, head_dim, config.rope_theta), 1.0
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        return inv_freq.float()[:num_pairs], attention_scaling

    @torch.no_grad()
    @dynamic_rope_update  # dynamic NTK and longrope recompute inv_freq from the sequence length
    def forward(self, x: torch.Tensor, position_ids: torch.LongTensor):
        # A dynamic update recomputes the full spectrum: the reserved Kuramoto pair keeps the slowest one out.
        angles = position_ids[..., None].float() * self.inv_freq[: self.num_pairs].float()
        if not self.reserve_content_pair:
            angles = torch.cat([angles, angles], dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)


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
        # Goals and recalled memories enter every layer as always-visible key/value prefix slots.
        if uses_prefix_slots(config):
            self.prefix_key_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
            self.prefix_value_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        if config.group_attention.enabled and config.group_attention.learned_selection:
            self.group_selection = ResoLLMPrimeSelection(self.num_heads, len(candidate_primes(config)))

    def _prefix_key_values(self, prefix_states: torch.Tensor):
        batch, slots, _ = prefix_states.shape
        shape = (batch, slots, self.num_key_value_heads, self.head_dim)
        keys = self.prefix_key_proj(prefix_states).view(shape).transpose(1, 2)
        values = self.prefix_value_proj(prefix_states).view(shape).transpose(1, 2)
        return keys, values

    def _content_phases(self, hidden_states, token_mask, segment_starts, past_key_values):
        """cos/sin of the coupled Kuramoto phase per key/value head, (B, H_kv, T, 1) each."""
        layer_cache = past_key_values.layers[self.layer_idx] if past_key_values is not None else None
        previous_sums = layer_cache.previous_phase_sums() if layer_cache is not None else None
        content_cos, content_sin, _, sums = self.kuramoto(hidden_states, token_mask, previous_sums, segment_starts)
        if layer_cache is not None:
            layer_cache.store_phase_sums(sums)
        return content_cos.unsqueeze(-1), content_sin.unsqueeze(-1)

    def _key_rotation(self, hidden_states, position_embeddings, token_mask, segment_starts, past_key_values):
        """cos/sin that rotate the keys: the positional ones, completed by the Kuramoto content phase."""
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.kuramoto is None:
            return cos, sin

        # Complete the positional half-angles with the content phase in the reserved last pair.
        content_cos, content_sin = self._content_phases(hidden_states, token_mask, segment_starts, past_key_values)
        shape = (content_cos.shape[0], content_cos.shape[1], -1, -1)  # local key/value heads under tensor parallelism
        cos, sin = cos.expand(shape), sin.expand(shape)
        content_cos, content_sin = content_cos.to(cos.dtype), content_sin.to(sin.dtype)
        if self.config.kuramoto_keeps_position:
            # The last pair turns by its positional angle a plus the content phase b: cos(a + b), sin(a + b).
            # A zero content phase (cos b = 1, sin b = 0) leaves standard RoPE exactly.
            position_cos, position_sin = cos[..., -1:], sin[..., -1:]
            cos, sin = cos[..., :-1], sin[..., :-1]
            content_cos, content_sin = (position_cos * content_cos - position_sin * content_sin,
                                        position_sin * content_cos + position_cos * content_sin)
        key_cos = torch.cat([cos, content_cos, cos, content_cos], dim=-1)
        key_sin = torch.cat([sin, content_sin, sin, content_sin], dim=-1)
        return key_cos, key_sin

    def _rotate(self, query_states, key_states, hidden_states, position_embeddings, token_mask, segment_starts,
                past_key_values):
        key_cos, key_sin = self._key_rotation(hidden_states, position_embeddings, token_mask, segment_starts,
                                              past_key_values)
        keys = apply_rotary(key_states, key_cos, key_sin)
        if self.kuramoto is None or self.num_key_value_groups == 1:
            return apply_rotary(query_states, key_cos, key_sin), keys
        # The content phase is per key/value head: rotate each query group by its head's angles through a
        # (B, H_kv, groups, T, D) view rather than repeating the angles for every query head.
        batch, heads, length, dim = query_states.shape
        grouped = query_states.view(batch, key_cos.shape[1], -1, length, dim)  # local heads under tensor parallelism
        queries = apply_rotary(grouped, key_cos.unsqueeze(2), key_sin.unsqueeze(2))
        return queries.view(batch, heads, length, dim), keys

    def cache_key_values(self, hidden_states, position_embeddings, token_mask=None, segment_starts=None,
                         past_key_values: Cache | None = None) -> None:
        """Only what later tokens read from this layer: the keys and values of ``hidden_states`` (and the Kuramoto
        running sums), written to the cache. For tokens that exited before this layer (adaptive depth)."""
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_cos, key_sin = self._key_rotation(hidden_states, position_embeddings, token_mask, segment_starts,
                                              past_key_values)
        past_key_values.update(apply_rotary(key_states, key_cos, key_sin), value_states, self.layer_idx)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        token_mask: torch.Tensor | None = None,
        segment_starts: torch.Tensor | None = None,
        prefix_states: torch.Tensor | None = None,
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
        if prefix_states is not None:  # never cached: the same slots are prepended at every step
            prefix_keys, prefix_values = self._prefix_key_values(prefix_states.to(key_states.dtype))
            key_states = torch.cat([prefix_keys, key_states], dim=2)
            value_states = torch.cat([prefix_values, value_states], dim=2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if isinstance(attention_mask, GroupAttentionMask):  # per-head group-structured masks (group_attention.py)
            attention_interface = attention_mask.routed(attention_interface)
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
        # Where each projection sits, for `initializer="phi_harmonic"` (`_init_weights` sees one module at a time).
        for submodule, names in PHI_HARMONIC_PROJECTIONS.items():
            for name in names:
                projection = getattr(getattr(self, submodule), name)
                projection.phi_harmonic_depth = layer_idx
                projection.writes_residual = name in RESIDUAL_WRITERS
        self.input_layernorm = ResoLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = ResoLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.coherence_gate = (
            ResoLLMCoherenceGate(config.hidden_size, config.coherence_threshold, config.coherence_sharpness,
                                 config.coherence_gate_normalized)
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
        prefix_states: torch.Tensor | None = None,
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
            prefix_states=prefix_states,
            past_key_values=past_key_values,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.coherence_gate is not None:
            hidden_states, _ = self.coherence_gate(hidden_states)
        return residual + hidden_states

    def cache_key_values(self, hidden_states, position_embeddings, token_mask=None, segment_starts=None,
                         past_key_values: Cache | None = None, **kwargs) -> None:
        """The keys and values this layer would cache for ``hidden_states``, without its attention or MLP: a skipped
        layer of tokens that exited earlier (adaptive depth, CALM's state propagation)."""
        self.self_attn.cache_key_values(self.input_layernorm(hidden_states), position_embeddings, token_mask,
                                        segment_starts, past_key_values)


def early_exit_loss_weights(num_layers: int, min_layers: int, scale: float, shape: str = "layerskip") -> list[float]:
    """Normalised weights w_1..w_L (sum 1) of the per-layer losses (README "Adaptive depth"). Layers a token may exit
    after (min_layers <= l < L) get e_l = scale * l(l-1)/2 ("layerskip": LayerSkip's e_scale * sum_{i<l} i with
    1-based l) or e_l = scale ("uniform"); the last layer e_L = (L-1) + scale * (L-1)(L-2)/2 ("layerskip") or 1;
    others 0. w_l = e_l / sum_k e_k."""
    raw = [0.0] * num_layers
    for depth in range(min_layers, num_layers):
        raw[depth - 1] = scale * (depth * (depth - 1) / 2 if shape == "layerskip" else 1.0)
    last = num_layers - 1
    raw[-1] = last + scale * last * (last - 1) / 2 if shape == "layerskip" else 1.0
    total = sum(raw)
    return [value / total for value in raw]


def uses_prefix_slots(config: ResoLLMConfig) -> bool:
    return config.agency.enabled or config.temporal_smf.enabled


def mask_with_prefix(causal_mask, prefix_visible, query_length: int, key_length: int, dtype, device):
    """Prepend always-visible prefix columns to a 4D attention mask (bool for sdpa, additive for eager).

    ``causal_mask`` may be None (sdpa without padding): then the plain causal pattern is materialised,
    since a prefix breaks the top-left alignment sdpa's ``is_causal`` assumes.
    """
    batch, slots = prefix_visible.shape
    if causal_mask is None:
        rows = torch.arange(query_length, device=device)[:, None] + (key_length - query_length)
        causal_mask = (torch.arange(key_length, device=device)[None, :] <= rows)[None, None].expand(batch, 1, -1, -1)
    prefix = prefix_visible[:, None, None, :].expand(batch, 1, query_length, slots)
    if causal_mask.dtype == torch.bool:
        return torch.cat([prefix, causal_mask], dim=-1)
    blocked = torch.finfo(causal_mask.dtype).min
    additive = torch.zeros_like(prefix, dtype=causal_mask.dtype).masked_fill(~prefix, blocked)
    return torch.cat([additive, causal_mask.expand(batch, -1, -1, -1)], dim=-1)


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


def _cache_argument(past_key_values, kwargs):
    """The KV cache, under either name: transformers 5.24 renamed `past_key_values` to `cache`, and its generate()
    passes `cache=`. Ignoring it would rebuild the cache at every step and drop the context after the prefill."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Got two different KV caches, `cache` and `past_key_values`: pass one of them.")
    return past_key_values if past_key_values is not None else cache


class ResoLLMDynamicPhaseLayer(DynamicLayer):
    """A `DynamicLayer` that also keeps Kuramoto's running sums per cached position (see `ResoLLMKuramoto`):
    (B, H_kv, T, 3) float32, grown, cropped, reordered and batch-selected with the keys and values, so one cache
    layer serves one decoder layer (`len(cache) == num_hidden_layers`)."""

    phase_sums: torch.Tensor | None = None

    def previous_phase_sums(self) -> torch.Tensor | None:
        if self.phase_sums is None or self.phase_sums.shape[2] == 0:
            return None
        return self.phase_sums[:, :, -1:]

    def store_phase_sums(self, sums: torch.Tensor) -> None:
        self.phase_sums = sums if self.phase_sums is None else torch.cat([self.phase_sums, sums], dim=2)

    def reset(self) -> None:
        super().reset()
        self.phase_sums = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.phase_sums is not None:
            self.phase_sums = self.phase_sums[:, :, :tokens_to_remove]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.phase_sums is not None:
            self.phase_sums = self.phase_sums.index_select(0, beam_idx.to(self.phase_sums.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.phase_sums is not None:
            self.phase_sums = self.phase_sums.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.phase_sums is not None:
            self.phase_sums = self.phase_sums[indices, ...]

    def offload(self):
        super().offload()
        if self.phase_sums is not None:
            self.phase_sums = self.phase_sums.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.phase_sums is not None and self.is_initialized and self.phase_sums.device != self.device:
            self.phase_sums = self.phase_sums.to(self.device, non_blocking=True)


class ResoLLMStaticPhaseLayer(StaticLayer):
    """A `StaticLayer` that also keeps Kuramoto's running sums in a preallocated (B, H_kv, max_cache_len, 3)
    buffer written at the cache positions: no data-dependent shapes or branches, so it compiles and exports."""

    phase_sums: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._allocate_phase_sums(key_states.shape[0], key_states.shape[1], key_states.device)

    def _allocate_phase_sums(self, batch_size: int, num_heads: int, device) -> None:
        if self.phase_sums is None:
            self.phase_sums = torch.zeros((batch_size, num_heads, self.max_cache_len, 3), device=device)
            if not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(self.phase_sums)

    def previous_phase_sums(self) -> torch.Tensor | None:
        if self.phase_sums is None:
            return None
        # The sums at the last cached position; zeros before the first token (adding them changes nothing).
        last = (self.cumulative_length - 1).clamp(min=0).reshape(1).to(self.phase_sums.device)
        filled = (self.cumulative_length > 0).to(self.phase_sums.dtype)
        return self.phase_sums.index_select(2, last) * filled

    def store_phase_sums(self, sums: torch.Tensor) -> None:
        # Called before the keys and values of the same tokens are written, so `cumulative_length` is their start.
        self._allocate_phase_sums(sums.shape[0], sums.shape[1], sums.device)
        positions = torch.arange(sums.shape[2], device=sums.device) + self.cumulative_length.to(sums.device)
        self.phase_sums.index_copy_(2, positions, sums)

    def reset(self) -> None:
        super().reset()
        if self.phase_sums is not None:
            self.phase_sums.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.phase_sums is not None:
            self.phase_sums.copy_(self.phase_sums.index_select(0, beam_idx.to(self.phase_sums.device)))


PHASE_CACHE_LAYERS = {DynamicLayer: ResoLLMDynamicPhaseLayer, StaticLayer: ResoLLMStaticPhaseLayer}


def _holds_tokens(layer) -> bool:
    """Whether a plain cache layer already holds tokens (their phase sums were never computed). Under tracing
    a static layer's length is symbolic: an early-initialised one is taken as empty, as export recipes build it."""
    if not layer.is_initialized:
        return False
    if isinstance(layer, StaticLayer) and torch.compiler.is_compiling():
        return False
    return bool(layer.get_seq_length() > 0)


# Checkpoint keys of reso-hf <= 0.1.0, whose prime code sat beside the token embedding.
LEGACY_KEY_MAPPING = {r"^model\.prime_code\.": "model.embed_tokens.prime_code.", r"^prime_code\.": "embed_tokens.prime_code."}


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
    _can_compile_fullgraph = True
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
        kwargs["key_mapping"] = {**LEGACY_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def set_input_embeddings(self, value: nn.Module):
        # `resize_token_embeddings` hands back the resized embedding (a plain nn.Embedding, or ours with a new
        # weight): keep the prime code around it, coding the primes of the new vocabulary size.
        backbone = self.base_model
        prime_code = backbone.prime_code
        if prime_code is not None:
            if not isinstance(value, ResoLLMTokenEmbedding):
                value = ResoLLMTokenEmbedding.around(value, prime_code)
            if value.prime_code.vocab_size != value.num_embeddings:
                value.prime_code.resize(value.num_embeddings)
        backbone.embed_tokens = value

    # Callables `hook(model, save_directory)` run after `save_pretrained` has written the folder, on the main
    # process only. reso_hf.hub appends its model-card writer; where reso_hf is not installed it stays empty.
    _post_save_hooks: list = []

    def save_pretrained(self, save_directory, is_main_process: bool = True, *args, **kwargs):
        result = super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        if is_main_process:
            for hook in ResoLLMPreTrainedModel._post_save_hooks:
                hook(self, save_directory)
        return result

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, ResoLLMRotaryEmbedding):
            # Not transformers' generic rotary init: the spectrum may be golden, and Kuramoto reserves a pair.
            inv_freq, _ = module.compute_inv_freq(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
            return
        depth = getattr(module, "phi_harmonic_depth", None)
        if depth is not None and self.config.initializer == "phi_harmonic":
            config = self.config
            std = phi_harmonic_std(config.initializer_range, depth, config.num_hidden_layers, module.in_features,
                                   config.hidden_size, module.writes_residual)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)
        # Non-persistent buffers are not in the checkpoint: recompute them whenever weights are initialised.
        if isinstance(module, ResoLLMPrimeCode):
            init.copy_(module.code_table, prime_code_table(module.vocab_size, module.code_dim))
            # The code entries are O(1), so a default-initialised projection would add fixed noise
            # several times larger than the learned embedding; start from zero and let training use it.
            init.zeros_(module.proj.weight)
        elif isinstance(module, ResoLLMKuramoto):
            init.constant_(module.coupling, module.coupling_init)
        elif isinstance(module, ResoLLMCoherenceGate):
            init.constant_(module.score.bias, ResoLLMCoherenceGate.INITIAL_BIAS)
        elif isinstance(module, ResoLLMPrimeSelection):
            init.zeros_(module.logits)
        elif isinstance(module, ResoLLMConceptBank):
            init.normal_(module.keys, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.values, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ResoLLMGeometricActivation):
            for buffer, value in zip((module.vertices, module.inverse_variances, module.output_scales),
                                     module.geometry(module.solid, module.num_groups)):
                init.copy_(buffer, value)


def _check_token_ids(input_ids: torch.LongTensor, vocab_size: int):
    out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
    if out_of_range.any():
        bad = input_ids[out_of_range][0].item()
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size - 1}]")


class ResoLLMModel(ResoLLMPreTrainedModel):
    """The ResoLLM backbone: embeddings, decoder layers and final norm (returns hidden states)."""

    def __init__(self, config: ResoLLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        if config.prime_embedding:
            prime_code = ResoLLMPrimeCode(config.vocab_size, config.prime_code_dim, config.hidden_size)
            self.embed_tokens = ResoLLMTokenEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                      prime_code)
        else:  # switched off: exactly Llama's embedding (same parameter names)
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.concept_bank = (
            ResoLLMConceptBank(config.hidden_size, config.prsc.max_bindings, config.prime_code_dim)
            if config.prsc.enabled and config.prsc.max_bindings > 0
            else None
        )
        self.layers = nn.ModuleList(
            [ResoLLMDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = ResoLLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ResoLLMRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def prime_code(self) -> ResoLLMPrimeCode | None:
        """The prime-code part of the token embedding (`prime_embedding=True`), or None."""
        return getattr(self.embed_tokens, "prime_code", None)

    def prepare_cache(self, past_key_values: Cache) -> Cache:
        """With `kuramoto=True`, make `past_key_values` keep the running phase sums: each decoder layer's own cache
        layer holds them, so the empty plain layers that `DynamicCache` / `StaticCache` (or `generate`) created are
        swapped for their phase-keeping subclasses. The forward pass does this itself; call it before `torch.export`
        so the sums exist before tracing (then register each layer's `phase_sums` as a buffer, like the keys and
        values). Without Kuramoto it returns the cache unchanged."""
        if self.config.kuramoto:
            self._prepare_phase_cache(past_key_values)
        return past_key_values

    def _prepare_phase_cache(self, past_key_values: Cache):
        layers = past_key_values.layers
        while len(layers) < self.config.num_hidden_layers:
            layers.append(DynamicLayer())
        for index, layer in enumerate(layers[: self.config.num_hidden_layers]):
            if isinstance(layer, (ResoLLMDynamicPhaseLayer, ResoLLMStaticPhaseLayer)):
                continue
            phase_layer = PHASE_CACHE_LAYERS.get(type(layer))
            if phase_layer is None or _holds_tokens(layer):
                raise ValueError(
                    f"kuramoto=True keeps its running phase sums in the KV cache; cache layer {index} is a "
                    f"{'filled ' if phase_layer is not None else ''}{type(layer).__name__}. Supported: an empty "
                    "DynamicCache or StaticCache (cache_implementation 'dynamic', 'static' or 'offloaded'), or one "
                    "this model filled"
                )
            if phase_layer is ResoLLMDynamicPhaseLayer:
                layers[index] = ResoLLMDynamicPhaseLayer()
                continue
            static = ResoLLMStaticPhaseLayer(max_cache_len=layer.max_cache_len)
            if layer.is_initialized:  # early-initialised (torch.export recipes): keep its registered tensors
                static.__dict__.update(layer.__dict__)
                static._allocate_phase_sums(layer.keys.shape[0], layer.keys.shape[1], layer.keys.device)
            layers[index] = static

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
        prefix_states: torch.Tensor | None = None,
        prefix_visible: torch.Tensor | None = None,
        bound_concepts: tuple[torch.Tensor, torch.Tensor] | None = None,
        exit_entropy_threshold: float | None = None,
        exit_head: nn.Module | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ResoLLMModelOutputWithPast:
        r"""
        prefix_states (`torch.Tensor` of shape `(batch, slots, hidden_size)`, *optional*):
            Goal / memory vectors entering every attention layer as always-visible prefix slots.
        prefix_visible (`torch.BoolTensor` of shape `(batch, slots)`, *optional*):
            Which prefix slots each row may see (default: all).
        bound_concepts (`tuple(keys, values)`, *optional*):
            Extra PRSC concept slots (the user's bindings), appended to the learned bank.
        exit_entropy_threshold (`float`, *optional*):
            Adaptive depth: entropy (nats) below which a token exits (default: `adaptive_depth.entropy_threshold` when
            `adaptive_depth.enabled`, else no exit; 0 never exits). Evaluation mode only; needs `exit_head`.
        exit_head (`nn.Module`, *optional*):
            The LM head that turns each normed intermediate state into the exit distribution; without it (the bare
            backbone) every layer runs.
        """
        past_key_values = _cache_argument(past_key_values, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if not torch.compiler.is_compiling():  # a data-dependent check: eager users get the clear error
                _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if self.concept_bank is not None:
            bound_keys, bound_values = bound_concepts if bound_concepts is not None else (None, None)
            inputs_embeds = self.concept_bank(inputs_embeds, bound_keys, bound_values)
        if prefix_states is not None and not uses_prefix_slots(self.config):
            raise ValueError("prefix_states needs agency.enabled or temporal_smf.enabled (the prefix projections)")

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if self.config.kuramoto and past_key_values is not None:
            self._prepare_phase_cache(past_key_values)

        seq_len = inputs_embeds.shape[1]
        past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens).unsqueeze(0)

        add_prefix = None
        if prefix_states is not None:
            if prefix_visible is None:
                prefix_visible = torch.ones(prefix_states.shape[:2], dtype=torch.bool, device=prefix_states.device)

            def add_prefix(mask):
                return mask_with_prefix(mask, prefix_visible, seq_len, past_seen_tokens + seq_len,
                                        inputs_embeds.dtype, inputs_embeds.device)

        if self.config.group_attention.enabled:
            causal_mask = create_group_attention_mask(self.config, inputs_embeds, attention_mask, past_key_values,
                                                      position_ids, dense_transform=add_prefix)
        else:
            causal_mask = create_causal_mask(
                self.config,
                inputs_embeds,
                attention_mask,
                past_key_values,  # positional: named `past_key_values` before 5.24, `cache` from 5.24
                position_ids=position_ids,
            )
            if add_prefix is not None:
                causal_mask = add_prefix(causal_mask)
        # Which of the new tokens are real (not padding): Kuramoto's mean field must ignore padding.
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq_len:]
        else:
            token_mask = torch.ones(inputs_embeds.shape[:2], device=inputs_embeds.device)

        # Packed documents restart their position ids; Kuramoto's mean field restarts with them (a no-op where
        # the only start is the first token, so no data-dependent branch is needed).
        segment_starts = None
        if self.config.kuramoto and seq_len > 1 and position_ids.shape[0] == inputs_embeds.shape[0]:
            segment_starts = position_ids == 0

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        layer_arguments = dict(position_embeddings=position_embeddings, attention_mask=causal_mask,
                               token_mask=token_mask, segment_starts=segment_starts, prefix_states=prefix_states,
                               past_key_values=past_key_values, position_ids=position_ids, **kwargs)
        if exit_head is None and exit_entropy_threshold is not None:
            raise ValueError("exit_entropy_threshold needs the LM head (exit_head=...): use ResoLLMForCausalLM")
        threshold = self.exit_threshold(exit_entropy_threshold) if exit_head is not None else None
        if threshold is not None:
            return self._adaptive_depth(hidden_states, layer_arguments, threshold, exit_head)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(hidden_states, **layer_arguments)
        hidden_states = self.norm(hidden_states)
        return ResoLLMModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    def exit_threshold(self, requested: float | None) -> float | None:
        """The entropy threshold of early exit for this forward pass, or None for full depth: `requested`, else the
        config's when `adaptive_depth.enabled` (evaluation mode only); 0 means full depth."""
        depth = self.config.adaptive_depth
        if requested is None:
            if not depth.enabled or self.training:
                return None
            requested = depth.entropy_threshold
        elif isinstance(requested, bool) or not isinstance(requested, (int, float)) or not requested >= 0:
            raise ValueError(f"exit_entropy_threshold={requested!r} is invalid: expected a number >= 0 (float('inf') "
                             "exits every token at adaptive_depth.min_layers; 0 never exits)")
        elif requested > 0 and self.training:
            raise ValueError("exit_entropy_threshold: early exit runs in evaluation mode only (call model.eval()); "
                             "training runs every layer and learns the exits through adaptive_depth.loss_scale")
        return float(requested) if requested > 0 else None

    def _adaptive_depth(self, hidden_states, layer_arguments: dict, threshold: float, exit_head: nn.Module):
        """The decoder stack with entropy-based early exit per token (see `AdaptiveDepthConfig`).

        A token that exits after layer l keeps its state h_l; every later layer still writes its keys and values,
        computed from h_l, so later tokens see the same cache whether earlier ones ran one at a time or together.
        While some token of the pass is still running, a layer runs on all of them (the exited ones' outputs are
        discarded); once all have exited, the remaining layers compute only keys and values (with a cache) or
        nothing (without), which is where decoding saves compute."""
        num_layers = self.config.num_hidden_layers
        min_layers = self.config.adaptive_depth.min_layers
        past_key_values = layer_arguments["past_key_values"]
        exited = torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        exit_layers = torch.full(hidden_states.shape[:2], num_layers, dtype=torch.long, device=hidden_states.device)
        exit_logits = None
        for depth, decoder_layer in enumerate(self.layers[:num_layers], start=1):
            if exit_logits is not None and bool(exited.all()):
                if past_key_values is None:
                    break
                decoder_layer.cache_key_values(hidden_states, **layer_arguments)
                continue
            output = decoder_layer(hidden_states, **layer_arguments)
            hidden_states = output if exit_logits is None else torch.where(exited[..., None], hidden_states, output)
            if min_layers <= depth < num_layers:
                logits = exit_head(self.norm(hidden_states))
                leaving = (entropy_of_scores(logits) < threshold) & ~exited
                if bool(leaving.any()):
                    exit_logits = logits if exit_logits is None else torch.where(leaving[..., None], logits,
                                                                                 exit_logits)
                    exit_layers = exit_layers.masked_fill(leaving, depth)
                    exited = exited | leaving
        return ResoLLMModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values,
                                          exit_layers=exit_layers, exit_logits=exit_logits)


class ResoLLMForCausalLM(ResoLLMPreTrainedModel, ResoLLMGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: ResoLLMConfig):
        super().__init__(config)
        self.model = ResoLLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.temporal_smf.enabled:
            self.memory_orientation = nn.Linear(config.hidden_size, len(SMF_AXES), bias=False)
        self.post_init()
        self.reso_state = ResoState(config)
        self.tokenizer = None

    @classmethod
    def from_llama(cls, source, **switches) -> "ResoLLMForCausalLM":
        """Convert a pretrained Llama-family causal LM (a Hub id, a folder, a `.gguf` file or a loaded model) into
        a ResoLLM that computes the same function: each switched-on component (`prime_embedding`, `kuramoto`,
        `coherence_gating`) starts as a no-op; `rope_spectrum="golden"` re-learns positions. See
        `reso_hf.conversion`."""
        try:
            from reso_hf.conversion import convert_from_llama
        except ImportError as error:
            raise ImportError("from_llama needs the reso-hf package: pip install reso-hf") from error
        return convert_from_llama(source, **switches)

    # ---------------------------------------------------------------------------------------------
    # State that outlives a call: goals, foci, bindings, memory (SPEC §3.5-§3.7)
    # ---------------------------------------------------------------------------------------------

    def attach_tokenizer(self, tokenizer) -> None:
        """The tokenizer used to turn goal descriptions, memories and concept names into vectors."""
        self.tokenizer = tokenizer

    def reset_state(self) -> None:
        """Forget all state that outlives a call (goals, foci, bindings, memory, stability window)."""
        self.reso_state.clear()
        self._reset_generation_state()

    def _require(self, component: str, method: str) -> None:
        if not getattr(self.config, component).enabled:
            raise ValueError(f"{method}() needs {component}.enabled=True in the config")

    @torch.no_grad()
    def text_vector(self, text: str, tokenizer=None) -> torch.Tensor:
        """Mean final hidden state of ``text`` (no goal or memory slots), the vector of goals and memories."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=..., call attach_tokenizer(), or use ResoLLMInference")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        return self._ids_vector(ids)

    @torch.no_grad()
    def _ids_vector(self, ids: torch.LongTensor) -> torch.Tensor:
        """Mean final hidden state of the (1, T) token ids, no goal or memory slots."""
        was_training = self.training
        self.eval()
        hidden = self.model(input_ids=ids, use_cache=False).last_hidden_state
        self.train(was_training)
        return hidden[0].float().mean(dim=0)

    def create_goal(self, description: str, goal_type: str = "task", tokenizer=None) -> Goal:
        """Register a goal; it enters every attention layer as a prefix slot until achieved or reset."""
        self._require("agency", "create_goal")
        if not isinstance(description, str) or not description.strip():
            raise ValueError(f"goal description must be a non-empty string, got {description!r}")
        return self.reso_state.add_goal(description, goal_type, self.text_vector(description, tokenizer))

    def get_active_goals(self) -> list[Goal]:
        return self.reso_state.active_goals()

    def get_attention_foci(self) -> list[AttentionFocus]:
        """Foci of the last `goal_telemetry` call (the positions the last token attended to most)."""
        return list(self.reso_state.foci)

    def bind_concept(self, name: str, token_id: int | None = None, concept: ConceptBinding | None = None):
        """Bind ``name`` to a PRSC slot keyed by the prime phasor code of ``token_id``'s prime (or of a
        composed concept from `compose`); returns the `ConceptBinding`."""
        self._require("prsc", "bind_concept")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"concept name must be a non-empty string, got {name!r}")
        if (token_id is None) == (concept is None):
            raise ValueError("bind_concept needs exactly one of token_id or concept")
        bindings = self.reso_state.bindings
        if name in bindings:
            raise ValueError(f"concept {name!r} is already bound (slot {bindings[name].slot})")
        if len(bindings) >= self.config.prsc.max_bindings:
            raise ValueError(f"prsc.max_bindings={self.config.prsc.max_bindings} concepts are already bound")
        if concept is None:
            concept = self._concept_of_token(name, token_id)
        binding = ConceptBinding(name, concept.prime, concept.key, concept.value,
                                 slot=self.config.prsc.max_bindings + len(bindings))
        bindings[name] = binding
        return binding

    @torch.no_grad()
    def _concept_of_token(self, name: str, token_id: int) -> ConceptBinding:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token_id={token_id!r} is invalid: expected an int in [0, {self.vocab_size - 1}]")
        prime = first_primes(token_id + 1)[token_id]
        bank = self.model.concept_bank
        key = bank.key_of_phasor(prime_phasor(prime, bank.code_dim // 2)).detach().float().cpu()
        value = self.model.embed_tokens.weight[token_id].detach().float().cpu()
        return ConceptBinding(name, prime, key, value)

    @torch.no_grad()
    def compose(self, first, second) -> ConceptBinding:
        """The composite of two concepts (bound names or token ids): prime p_a*p_b, key from the phasor
        code c(p_a*p_b) = c(p_a) * c(p_b), value the sum of both values. Bind it with
        ``bind_concept(name, concept=...)``."""
        self._require("prsc", "compose")
        parts = [self.reso_state.bindings[c] if isinstance(c, str) and c in self.reso_state.bindings
                 else self._concept_for(c) for c in (first, second)]
        prime = parts[0].prime * parts[1].prime
        bank = self.model.concept_bank
        key = bank.key_of_phasor(prime_phasor(prime, bank.code_dim // 2)).detach().float().cpu()
        return ConceptBinding(f"{parts[0].name}*{parts[1].name}", prime, key, parts[0].value + parts[1].value)

    def _concept_for(self, reference) -> ConceptBinding:
        if isinstance(reference, str):
            raise ValueError(f"concept {reference!r} is not bound; bound: {sorted(self.reso_state.bindings)}")
        return self._concept_of_token(str(reference), reference)

    def _bound_concepts(self):
        bindings = list(self.reso_state.bindings.values())
        if not bindings or self.model.concept_bank is None:
            return None
        return torch.stack([b.key for b in bindings]), torch.stack([b.value for b in bindings])

    def update_memory(self, text: str, importance: float = 1.0, tokenizer=None, kind: str = "episodic",
                      relations=None) -> MemoryEntry:
        """Store ``text`` in the Temporal SMF memory (key = mean hidden state, orientation on 16 axes).

        ``kind`` is "episodic" (decays at `memory_decay_rate`) or "semantic" (at `semantic_decay_rate`);
        ``relations``, (subject, relation, object) triples of the knowledge graph, need `temporal_smf.store="indexed"`."""
        self._require("temporal_smf", "update_memory")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"memory text must be a non-empty string, got {text!r}")
        if isinstance(importance, bool) or not isinstance(importance, (int, float)) or not 0 <= importance <= 1:
            raise ValueError(f"importance must be a number in [0, 1], got {importance!r}")
        key = self.text_vector(text, tokenizer)
        with torch.no_grad():
            orientation = torch.tanh(self.memory_orientation(key.to(self.memory_orientation.weight)))
        return self.reso_state.memory.add(key, orientation, importance, text, kind, relations or ())

    def recall(self, query, k: int | None = None, tokenizer=None) -> list[tuple[MemoryEntry, float]]:
        """Top-k memories by cosine x strength for a text or vector query; they become the memory
        context that enters attention as prefix slots (until `clear_memory_context` or `reset_state`)."""
        self._require("temporal_smf", "recall")
        k = self.config.temporal_smf.recall_k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        vector = self.text_vector(query, tokenizer) if isinstance(query, str) else query
        recalled = self.reso_state.memory.recall(vector, k)
        self.reso_state.memory_context = [entry for entry, _ in recalled]
        return recalled

    def clear_memory_context(self) -> None:
        self.reso_state.memory_context = []

    @torch.no_grad()
    def statement_log_likelihood(self, statement_ids, context_ids) -> float:
        """sum_i log p(statement_i | context, statement_<i) under this model (float64 log-softmax), with the goal
        prefix slots but without memory prefix slots (the evidence must come only from the context)."""
        statement_ids, context_ids = list(statement_ids), list(context_ids)
        if not statement_ids or not context_ids:
            raise ValueError("statement and context must each hold at least one token")
        ids = torch.tensor([context_ids + statement_ids], device=self.device)
        saved_context = self.reso_state.memory_context
        self.reso_state.memory_context = []
        was_training = self.training
        self.eval()
        try:
            logits = self(input_ids=ids, use_cache=False).logits[0]
        finally:
            self.reso_state.memory_context = saved_context
            self.train(was_training)
        predicting = logits[len(context_ids) - 1: -1].double()  # the positions whose next token is the statement's
        targets = ids[0, len(context_ids):]
        return float(torch.log_softmax(predicting, dim=-1).gather(-1, targets[:, None]).sum())

    def verify_statement(self, statement, evidence=None, k: int | None = None, tokenizer=None) -> dict:
        """Fact verification: how much the evidence raises the model's own likelihood of ``statement``.

        score = log p(statement | start, evidence) - log p(statement | start), both sums over the statement's tokens,
        with start the BOS token (EOS when there is none) and the evidence texts joined by newlines and followed by
        one. ``statement`` is a string or token ids; ``evidence`` a list of texts, or None to recall the top-``k``
        (default `recall_k`) memories by the statement's own vector (the memory context is left as it is).
        Returns {"score", "log_likelihood_with", "log_likelihood_without", "evidence", "statement_tokens"}."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=..., call attach_tokenizer(), or use ResoLLMInference")
        if isinstance(statement, str):
            if not statement.strip():
                raise ValueError(f"statement must be a non-empty string or token ids, got {statement!r}")
            statement_ids = tokenizer(statement, add_special_tokens=False)["input_ids"]
        else:
            statement_ids = [int(t) for t in statement]
        if not statement_ids:
            raise ValueError("statement has no tokens")
        start = self.config.bos_token_id if self.config.bos_token_id is not None else self.config.eos_token_id
        if start is None:
            raise ValueError("verify_statement needs config.bos_token_id or config.eos_token_id as the start token")
        if evidence is None:
            self._require("temporal_smf", "verify_statement")
            k = self.config.temporal_smf.recall_k if k is None else k
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"k must be an int >= 1, got {k!r}")
            vector = self._ids_vector(torch.tensor([statement_ids], device=self.device))
            evidence = [entry.text for entry, _ in self.reso_state.memory.recall(vector, k)]
        elif isinstance(evidence, str) or not all(isinstance(e, str) for e in evidence):
            raise ValueError(f"evidence must be a list of strings or None, got {evidence!r}")
        evidence = list(evidence)
        evidence_ids = tokenizer("\n".join(evidence) + "\n", add_special_tokens=False)["input_ids"] if evidence else []
        without = self.statement_log_likelihood(statement_ids, [start])
        with_evidence = self.statement_log_likelihood(statement_ids, [start] + evidence_ids)
        return {"score": with_evidence - without, "log_likelihood_with": with_evidence,
                "log_likelihood_without": without, "evidence": evidence, "statement_tokens": len(statement_ids)}

    # ---------------------------------------------------------------------------------------------
    # Goal progress and attention foci (SPEC §3.6), reported in ResoGenerateOutput
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def goal_telemetry(self, sequences: torch.LongTensor, prompt_length: int):
        """Per sequence: (descriptions of goals achieved, attention summary). Updates goal progress
        (cosine of the generated text's mean hidden state to the goal, clipped to [0, 1]) and the foci."""
        batch = sequences.shape[0]
        if not self.config.agency.enabled:
            return [[] for _ in range(batch)], [{} for _ in range(batch)]
        mask = torch.ones_like(sequences, dtype=torch.bool)
        if self.config.pad_token_id is not None:
            mask = sequences != self.config.pad_token_id
        hidden, attention, prefix_slots = self._hidden_and_attention(sequences, mask)
        goals = self.reso_state.active_goals()
        goal_vectors = torch.stack([g.vector for g in goals]).to(hidden) if goals else None
        generated = mask.clone()
        generated[:, :prompt_length] = False
        achieved, summaries, progress_rows = [], [], []
        threshold = self.config.agency.goal_coherence_threshold
        for row in range(batch):
            progress = torch.zeros(len(goals))
            if goals and generated[row].any():
                mean = hidden[row][generated[row]].mean(dim=0)
                progress = torch.cosine_similarity(goal_vectors, mean[None], dim=-1).clamp(0, 1).cpu()
            progress_rows.append(progress)
            achieved.append([g.description for g, p in zip(goals, progress) if p >= threshold])
            foci = self._foci(sequences[row], hidden[row], attention[row], mask[row], prefix_slots, goal_vectors)
            if row == 0:
                self.reso_state.foci = foci
            summaries.append({
                "foci": [vars(f) for f in foci],
                "prefix_attention": float(attention[row, -1, :prefix_slots].sum()) if prefix_slots else 0.0,
                "goal_progress": {g.description: float(p) for g, p in zip(goals, progress)},
            })
        for index, goal in enumerate(goals):
            goal.progress = float(torch.stack([p[index] for p in progress_rows]).mean())
            goal.achieved = any(goal.description in row for row in achieved)
        return achieved, summaries

    def _hidden_and_attention(self, sequences, mask):
        """Final hidden states and the last real token's attention averaged over layers and heads."""
        implementation = self.config._attn_implementation
        self.config._attn_implementation = "eager"  # only eager returns attention weights
        try:
            prefix = self.reso_state.prefix_vectors()
            prefix = prefix.to(self.device)[None].expand(sequences.shape[0], -1, -1) if prefix is not None else None
            outputs = self.model(input_ids=sequences, attention_mask=mask.long(), use_cache=False,
                                 output_attentions=True, prefix_states=prefix, bound_concepts=self._bound_concepts())
        finally:
            self.config._attn_implementation = implementation
        last = mask.long().cumsum(-1).argmax(-1)  # index of the last real token per row
        rows = torch.arange(sequences.shape[0])
        weights = torch.stack([a[rows, :, last] for a in outputs.attentions]).mean(dim=(0, 2))  # (B, P + T)
        return outputs.last_hidden_state.float(), weights.float()[:, None, :], 0 if prefix is None else prefix.shape[1]

    def _foci(self, tokens, hidden, attention, mask, prefix_slots, goal_vectors) -> list[AttentionFocus]:
        agency = self.config.agency
        mass = attention[-1, prefix_slots:].masked_fill(~mask, 0.0)
        chosen = mass.topk(min(agency.max_foci, int(mask.sum()))).indices.tolist()
        foci, earlier = [], []
        for position in chosen:
            vector = hidden[position]
            novelty = 1.0 - max((float(torch.cosine_similarity(vector, e, dim=0)) for e in earlier), default=0.0)
            relevance = 0.0
            if goal_vectors is not None:
                relevance = float(torch.cosine_similarity(goal_vectors, vector[None], dim=-1).max().clamp(0, 1))
            intensity = float(mass[position])
            score = (agency.intensity_weight * intensity + agency.novelty_weight * novelty
                     + agency.relevance_weight * relevance)
            foci.append(AttentionFocus("token", int(tokens[position]), position, intensity, novelty, relevance, score))
            earlier.append(vector)
        return sorted(foci, key=lambda f: f.score, reverse=True)

    # ---------------------------------------------------------------------------------------------
    # Prefix slots for the forward pass
    # ---------------------------------------------------------------------------------------------

    def _prefix_inputs(self, input_ids, attention_mask, labels, batch_size):
        """(prefix_states, prefix_visible): the state's goals and memories, or in SFT the answer's own
        mean hidden state as goal for a random `agency.goal_dropout` share of rows (goal dropout)."""
        vectors = self.reso_state.prefix_vectors()
        if vectors is not None:
            return vectors.to(self.device, self.dtype)[None].expand(batch_size, -1, -1), None
        if self.config.agency.enabled and self.training and labels is not None and input_ids is not None:
            return self._answer_goals(input_ids, attention_mask, labels)
        return None, None

    @torch.no_grad()
    def _answer_goals(self, input_ids, attention_mask, labels):
        answer = labels != -100
        if attention_mask is not None:
            answer &= attention_mask.bool()
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        count = answer.sum(-1, keepdim=True)
        goal = (hidden * answer[..., None]).sum(1) / count.clamp(min=1)
        keep = (torch.rand(input_ids.shape[0], device=input_ids.device) < self.config.agency.goal_dropout)
        keep &= count[:, 0] > 0
        if not keep.any():
            return None, None
        return goal[:, None, :], keep[:, None]

    # ---------------------------------------------------------------------------------------------
    # Persistence of the state (safetensors + JSON)
    # ---------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, save_memory: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`; with ``save_memory=True`` also the goals, memory and
        concept bindings (`reso_state.safetensors` + `reso_state.json`, written atomically)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if save_memory and kwargs.get("is_main_process", True):
            self.reso_state.save(str(save_directory))
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, load_memory: bool = True, **kwargs):
        """`PreTrainedModel.from_pretrained`; restores saved state (``save_memory=True``) when present."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        folder = str(pretrained_model_name_or_path)
        if load_memory and os.path.isfile(os.path.join(folder, STATE_JSON_FILE)):
            model.reso_state.load(folder)
        return loaded

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
        exit_entropy_threshold: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ResoLLMCausalLMOutputWithPast:
        r"""
        exit_entropy_threshold (`float`, *optional*):
            Adaptive depth (evaluation mode): a token exits after the first layer l >= `adaptive_depth.min_layers`
            whose distribution softmax(lm_head(norm(h_l))) has entropy below this (nats); its logits are those.
            Default: `adaptive_depth.entropy_threshold` when `adaptive_depth.enabled`, else full depth; 0 is full
            depth. `generate(..., exit_entropy_threshold=...)` passes it to every step.
        """
        past_key_values = _cache_argument(past_key_values, kwargs)
        exit_losses = labels is not None and self.training and self.config.adaptive_depth.loss_scale > 0
        batch_size = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        prefix_states, prefix_visible = self._prefix_inputs(input_ids, attention_mask, labels, batch_size)
        if self.config.temporal_smf.enabled and not self.training and past_key_values is not None:
            if past_key_values.get_seq_length() > 0:  # a generation step ages the memories
                self.reso_state.memory.advance(1)
        outputs: ResoLLMModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            prefix_states=prefix_states,
            prefix_visible=prefix_visible,
            bound_concepts=self._bound_concepts(),
            exit_entropy_threshold=exit_entropy_threshold,
            exit_head=self.lm_head,
            **({**kwargs, "output_hidden_states": True} if exit_losses else kwargs),
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        if outputs.exit_logits is None:
            logits = self.lm_head(hidden_states[:, slice_indices, :])
        else:  # the exited tokens' logits were computed at their exit layer
            exited = (outputs.exit_layers < self.config.num_hidden_layers)[:, slice_indices, None]
            logits = outputs.exit_logits[:, slice_indices]
            if not bool(exited.all()):
                logits = torch.where(exited, logits, self.lm_head(hidden_states[:, slice_indices, :]))

        loss = layer_losses = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if exit_losses:
                loss, layer_losses = self._early_exit_loss(outputs.hidden_states, loss, labels, **kwargs)
                if not kwargs.get("output_hidden_states", self.config.output_hidden_states):
                    outputs.hidden_states = None

        return ResoLLMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gates=outputs.gates,
            coherence=outputs.coherence,
            exit_layers=outputs.exit_layers,
            layer_losses=layer_losses,
        )

    def _early_exit_loss(self, hidden_states, final_loss, labels, **kwargs):
        """LayerSkip's training loss: sum_l w_l * loss_l with the weights of `early_exit_loss_weights`, where loss_l
        is the LM loss of lm_head(norm(h_l)) (h_l the output of layer l) and loss_L the plain one. Returns (the
        weighted loss, the (L,) per-layer losses, 0 where w_l = 0)."""
        config = self.config
        weights = early_exit_loss_weights(config.num_hidden_layers, config.adaptive_depth.min_layers,
                                          config.adaptive_depth.loss_scale, config.adaptive_depth.loss_weights)
        zero = final_loss.new_zeros(())
        losses = []
        for depth, weight in enumerate(weights[:-1], start=1):
            if weight == 0:
                losses.append(zero)
                continue
            logits = self.lm_head(self.model.norm(hidden_states[depth]))  # hidden_states[0] is the embedding output
            losses.append(self.loss_function(logits=logits, labels=labels, vocab_size=config.vocab_size, **kwargs))
        layer_losses = torch.stack([*losses, final_loss])
        weighted = sum(weight * loss for weight, loss in zip(weights, layer_losses.unbind()) if weight > 0)
        return weighted, layer_losses.detach()


# The generic task heads, as for Llama. Their backbone is built here rather than by the generic
# `AutoModel.from_config`, which a trust_remote_code checkpoint could not resolve where reso_hf is not installed.


class ResoLLMForSequenceClassification(GenericForSequenceClassification, ResoLLMPreTrainedModel):
    def __init__(self, config: ResoLLMConfig):
        ResoLLMPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ResoLLMModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()


class ResoLLMForTokenClassification(GenericForTokenClassification, ResoLLMPreTrainedModel):
    def __init__(self, config: ResoLLMConfig):
        ResoLLMPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ResoLLMModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels,
                               bias=getattr(config, "token_classification_bias", True))
        self.post_init()


class ResoLLMForQuestionAnswering(GenericForQuestionAnswering, ResoLLMPreTrainedModel):
    def __init__(self, config: ResoLLMConfig):
        ResoLLMPreTrainedModel.__init__(self, config)
        self.model = ResoLLMModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    set_input_embeddings = ResoLLMPreTrainedModel.set_input_embeddings  # keeps the prime code when resizing


__all__ = [
    "ResoLLMPreTrainedModel",
    "ResoLLMModel",
    "ResoLLMForCausalLM",
    "ResoLLMForSequenceClassification",
    "ResoLLMForTokenClassification",
    "ResoLLMForQuestionAnswering",
]
