"""Layer wrappers of the DynamicLoRA tuner: a hierarchy of LoRA tiers on one nn.Linear or GPT-2 Conv1D.

Each tier t of an adapter owns its own factors A_t (r_t x in) and B_t (out x r_t) as separate parameters,
so that tiers can be saved, frozen, excluded from DDP or synchronised one by one. The forward pass
concatenates them and computes the whole adapter as ONE low-rank product:

    y = W0 x + B_cat diag(s) A_cat x,   A_cat = [A_1; ...; A_T],  B_cat = [B_1, ..., B_T],

with s the per-column scaling (s_t repeated r_t times), which equals sum_t s_t B_t A_t x.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import DynamicLoraConfig

SUPPORTED_BASE_LAYERS = "torch.nn.Linear, transformers.pytorch_utils.Conv1D"
# In adapter_names (mixed-adapter batches), the rows that get no adapter: PEFT's name for them.
BASE_ADAPTER_NAME = "__base__"


class DynamicLoraLayer(BaseTunerLayer):
    """Mixin holding the per-tier factors of every adapter on one base layer."""

    adapter_layer_names: tuple[str, ...] = ("dynamic_lora_A", "dynamic_lora_B")
    # every per-adapter structure, so that BaseTunerLayer.delete_adapter removes the adapter from all of them
    other_param_names: tuple[str, ...] = (
        "dynamic_lora_dropout", "dynamic_lora_scale", "tier_names", "tier_ranks", "tier_scalings", "_fused_cache",
    )

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.dynamic_lora_A = nn.ModuleDict()
        self.dynamic_lora_B = nn.ModuleDict()
        self.dynamic_lora_dropout = nn.ModuleDict()
        # Per rank-column scaling s; derived from the config, so it is not part of the checkpoint.
        self.dynamic_lora_scale = BufferDict(persistent=False)
        self.tier_names: dict[str, list[str]] = {}
        self.tier_ranks: dict[str, dict[str, int]] = {}
        self.tier_scalings: dict[str, dict[str, float]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._fused_cache: dict[str, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

        if isinstance(base_layer, nn.Linear):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.weight_is_transposed = False
        elif isinstance(base_layer, Conv1D):
            # Conv1D stores its weight as (in, out) and computes x @ W + b
            self.in_features, self.out_features = base_layer.weight.shape
            self.weight_is_transposed = True
        else:
            raise ValueError(
                f"DynamicLoRA cannot wrap {type(base_layer).__name__}; supported base layers: {SUPPORTED_BASE_LAYERS}."
            )

    # ----- construction ------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: DynamicLoraConfig) -> None:
        tiers = list(config.tiers)
        factors_a = nn.ParameterDict()
        factors_b = nn.ParameterDict()
        base_weight = self.get_base_layer().weight
        device = base_weight.device if base_weight.device.type != "meta" else None
        dtype = base_weight.dtype if base_weight.dtype.is_floating_point else torch.float32
        for tier in tiers:
            rank = config.rank_of(tier)
            factor_a = torch.empty(rank, self.in_features, device=device, dtype=dtype)
            factor_b = torch.empty(self.out_features, rank, device=device, dtype=dtype)
            # Same initialisation family as LoRA: Kaiming-uniform A, zero B, so the adapter starts as a no-op.
            nn.init.kaiming_uniform_(factor_a, a=math.sqrt(5))
            if config.init_weights:
                nn.init.zeros_(factor_b)
            else:
                nn.init.normal_(factor_b, std=1.0 / math.sqrt(rank))
            factors_a[tier] = nn.Parameter(factor_a)
            factors_b[tier] = nn.Parameter(factor_b)
        self.dynamic_lora_A[adapter_name] = factors_a
        self.dynamic_lora_B[adapter_name] = factors_b
        self.dynamic_lora_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.tier_names[adapter_name] = tiers
        self.tier_ranks[adapter_name] = {t: config.rank_of(t) for t in tiers}
        self.tier_scalings[adapter_name] = {t: config.scaling_of(t) for t in tiers}
        scale = torch.cat(
            [torch.full((config.rank_of(t),), config.scaling_of(t), dtype=dtype) for t in tiers]
        )
        self.dynamic_lora_scale[adapter_name] = scale.to(device) if device is not None else scale
        self.set_adapter(self.active_adapters)

    # ----- factors -----------------------------------------------------------------------------------------
    def tier_slices(self, adapter_name: str) -> dict[str, slice]:
        """Column range of every tier inside the concatenated factors."""
        slices, start = {}, 0
        for tier in self.tier_names[adapter_name]:
            rank = self.tier_ranks[adapter_name][tier]
            slices[tier] = slice(start, start + rank)
            start += rank
        return slices

    def fused_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_cat, B_cat, s): the concatenated factors and per-column scaling of one adapter.

        Without autograd (and outside torch.distributed) the concatenation is cached and reused until any factor
        changes in place (the parameters' version counters are part of the cache key), so inference pays for it once.
        """
        tiers = self.tier_names[adapter_name]
        factors_a = [self.dynamic_lora_A[adapter_name][t] for t in tiers]
        factors_b = [self.dynamic_lora_B[adapter_name][t] for t in tiers]
        scale = self.dynamic_lora_scale[adapter_name]
        needs_graph = torch.is_grad_enabled() and any(p.requires_grad for p in factors_a + factors_b)
        # FSDP2 gathers the factors of every forward into the same tensors and preserves their version counters
        # (torch.autograd._unsafe_preserve_version_counter): the cache would keep an earlier forward's factors
        # (evaluation after more training steps saw the old adapter). No cache in a distributed process.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if needs_graph or distributed:
            return torch.cat(factors_a, dim=0), torch.cat(factors_b, dim=1), scale
        key = tuple((id(p), p._version) for p in factors_a + factors_b)
        cached = self._fused_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.cat(factors_a, dim=0), torch.cat(factors_b, dim=1))
            self._fused_cache[adapter_name] = cached
        return cached[1], cached[2], scale

    def tier_delta_weight(self, adapter_name: str, tier: str) -> torch.Tensor:
        """s_t B_t A_t in (out, in) orientation (tests and diagnostics; forms the full matrix)."""
        scaling = self.tier_scalings[adapter_name][tier]
        return scaling * (self.dynamic_lora_B[adapter_name][tier] @ self.dynamic_lora_A[adapter_name][tier])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The whole adapter's weight change, in the orientation of the base layer's weight."""
        factor_a, factor_b, scale = self.fused_factors(adapter_name)
        delta = factor_b @ (scale[:, None] * factor_a)
        return delta.T if self.weight_is_transposed else delta

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        # PEFT >= 0.22 builds convert_to_lora (and other delta-based tools) on this hook: DynamicLoRA is additive
        return self.get_delta_weight(adapter_name)

    def unfused_delta(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """sum_t s_t B_t A_t x computed tier by tier: the reference that the fused forward must equal."""
        total = None
        for tier in self.tier_names[adapter_name]:
            part = self.tier_scalings[adapter_name][tier] * F.linear(
                F.linear(x, self.dynamic_lora_A[adapter_name][tier]), self.dynamic_lora_B[adapter_name][tier]
            )
            total = part if total is None else total + part
        return total

    # ----- merging -----------------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        for adapter_name in adapter_names:
            if adapter_name not in self.dynamic_lora_A:
                continue
            delta = self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)
            if safe_merge:
                merged = base_layer.weight.data + delta
                if not torch.isfinite(merged).all():
                    # PEFT's shared wording (every tuner raises it), which tooling matches on
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken"
                    )
                base_layer.weight.data = merged
            else:
                base_layer.weight.data += delta
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        if not self.merged:
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            adapter_name = self.merged_adapters.pop()
            if adapter_name in self.dynamic_lora_A:
                base_layer.weight.data -= self.get_delta_weight(adapter_name).to(base_layer.weight.dtype)

    # ----- forward -----------------------------------------------------------------------------------------
    def _adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """B_cat diag(s) A_cat dropout(x): one adapter's contribution to the layer output."""
        factor_a, factor_b, scale = self.fused_factors(adapter_name)
        adapter_input = self._cast_input_dtype(x, factor_a.dtype)
        hidden = F.linear(self.dynamic_lora_dropout[adapter_name](adapter_input), factor_a) * scale
        return F.linear(hidden, factor_b)

    def _check_adapter_names(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if len(adapter_names) != len(x):
            raise ValueError(
                f"adapter_names must name one adapter (or '{BASE_ADAPTER_NAME}') per row of the batch: got "
                f"{len(adapter_names)} names for {len(x)} rows."
            )
        if self.merged:
            raise ValueError(
                f"adapter_names cannot select adapters per row while adapters {self.merged_adapters} are merged into "
                "the base weights; call unmerge_adapter() first."
            )

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Row i of the batch gets adapter adapter_names[i] alone ('__base__': the base layer only)."""
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        rows_of: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_of.setdefault(name, []).append(row)
        for adapter_name, rows in rows_of.items():
            # an adapter that does not adapt this layer leaves its rows unchanged here, as in the normal forward
            if adapter_name == BASE_ADAPTER_NAME or adapter_name not in self.dynamic_lora_A:
                continue
            index = torch.tensor(rows, device=x.device)
            delta = self._adapter_output(x.index_select(0, index), adapter_name)
            result = result.index_add(0, index, delta.to(result.dtype))
        return result.to(result_dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            self._check_adapter_names(x, adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for adapter_name in self.active_adapters:
            if adapter_name not in self.dynamic_lora_A:
                continue
            result = result + self._adapter_output(x, adapter_name)
        return result.to(result_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        # The adapter is additive (W0 + B_cat diag(s) A_cat) and get_delta_weight gives the change in the base
        # weight's orientation, which is what peft.tuners.lora.conversion.convert_to_lora factorises.
        return True

    def __repr__(self) -> str:
        return "dynamic_lora." + super().__repr__()


class DynamicLoraLinear(nn.Module, DynamicLoraLayer):
    """DynamicLoRA around an nn.Linear."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DynamicLoraConfig) -> None:
        super().__init__()
        DynamicLoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    # nn.Module comes first in the bases (so that its attribute machinery is used), which would make its
    # placeholder forward win over the mixin's: point at the mixin's explicitly.
    forward = DynamicLoraLayer.forward
    __repr__ = DynamicLoraLayer.__repr__


class DynamicLoraConv1D(DynamicLoraLinear):
    """DynamicLoRA around transformers' Conv1D (GPT-2), whose weight is stored transposed (in, out);
    `DynamicLoraLayer` reads the layout from the base layer, so the wrapper is the Linear one."""


def create_dynamic_lora_module(target: nn.Module, adapter_name: str, config: DynamicLoraConfig) -> nn.Module:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        return DynamicLoraLinear(target, adapter_name, config)
    if isinstance(base, Conv1D):
        return DynamicLoraConv1D(target, adapter_name, config)
    raise ValueError(
        f"DynamicLoRA cannot adapt a module of type {type(base).__name__}; supported: {SUPPORTED_BASE_LAYERS}. "
        "Adjust target_modules."
    )
