"""`add_weighted_adapter` for DynamicLoRA: a new adapter from a weighted sum of existing ones, tier by tier.

Every tier keeps its meaning (inertia, scope, privacy), so adapters are combined tier by tier: tier t of the new
adapter approximates (or, for "cat", equals) sum_i w_i dW_{i,t}, where dW_{i,t} = s_{i,t} B_{i,t} A_{i,t} is the
change that tier t of adapter i makes on a module. A combination across tiers (one SVD of the whole change) would
move content of a private or session-scoped tier into a shared one.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Optional, Union

import torch

from .config import ALLOWED_PRIVACY, KNOWN_TIERS
from .layer import BASE_ADAPTER_NAME

if TYPE_CHECKING:
    from .model import DynamicLoraModel

COMBINATION_TYPES: tuple[str, ...] = ("svd", "cat", "linear")


def _check_arguments(tuner, adapters, weights, adapter_name, combination_type, svd_rank) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type must be one of {list(COMBINATION_TYPES)} for DynamicLoRA, got {combination_type!r}."
        )
    if not adapters:
        raise ValueError("adapters must name at least one adapter to combine.")
    if len(weights) != len(adapters):
        raise ValueError(f"weights must hold one weight per adapter: {len(weights)} weights for {len(adapters)} adapters.")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}.")
    unknown = [a for a in adapters if a not in tuner.peft_config]
    if unknown:
        raise ValueError(f"adapters {unknown} do not exist; allowed: {sorted(tuner.peft_config)}.")
    if adapter_name in tuner.peft_config or adapter_name == BASE_ADAPTER_NAME:
        raise ValueError(
            f"adapter_name {adapter_name!r} is already taken (adapters: {sorted(tuner.peft_config)}; "
            f"{BASE_ADAPTER_NAME!r} is reserved): choose a new name."
        )
    with_modules_to_save = [a for a in adapters if tuner.peft_config[a].modules_to_save]
    if with_modules_to_save:
        raise ValueError(
            f"adapters {with_modules_to_save} train whole modules (modules_to_save), which add_weighted_adapter does "
            "not combine; combine adapters without modules_to_save."
        )
    if svd_rank is not None and combination_type != "svd":
        raise ValueError(f"svd_rank applies to combination_type='svd' only, got combination_type={combination_type!r}.")


def _tier_ranks(configs, tiers, combination_type, svd_rank) -> dict[str, int]:
    """Rank of every tier of the new adapter."""
    if combination_type == "cat":
        return {t: sum(c.rank_of(t) for c in configs if t in c.tiers) for t in tiers}
    if combination_type == "linear":
        layouts = {tuple((x["name"], x["rank"]) for x in c.tier_layout()) for c in configs}
        if len(layouts) != 1:
            raise ValueError(
                "combination_type='linear' averages the factors, so every adapter needs the same tiers and ranks; got "
                f"the layouts {sorted(layouts)}. Use 'cat' (exact) or 'svd'."
            )
        return {t: configs[0].rank_of(t) for t in tiers}
    largest = {t: max(c.rank_of(t) for c in configs if t in c.tiers) for t in tiers}
    if svd_rank is None:
        return largest
    if isinstance(svd_rank, int) and not isinstance(svd_rank, bool):
        requested = {t: svd_rank for t in tiers}
    elif isinstance(svd_rank, dict):
        extra = [t for t in svd_rank if t not in tiers]
        if extra:
            raise ValueError(f"svd_rank has tiers {extra} that no combined adapter holds; allowed: {tiers}.")
        requested = {t: svd_rank.get(t, largest[t]) for t in tiers}
    else:
        raise ValueError(f"svd_rank must be None, a positive int or a dict tier -> positive int, got {svd_rank!r}.")
    bad = {t: r for t, r in requested.items() if not isinstance(r, int) or isinstance(r, bool) or r <= 0}
    if bad:
        raise ValueError(f"svd_rank must give every tier a positive integer rank (allowed: 1, 2, ...), got {bad}.")
    return requested


def _combined_config(tuner, configs, tiers, ranks, modules):
    """The first adapter's config with the combined tier layout, targeting exactly the combined modules."""
    config = copy.deepcopy(configs[0])
    config.__dict__.pop("_dynamics_source", None)  # where the first input was loaded from: not this adapter's origin
    config.tiers = list(tiers)
    config.tier_ranks = dict(ranks)
    # a tier holds the content of that tier of every input: it is as private as the most private of them
    strictness = {p: i for i, p in enumerate(ALLOWED_PRIVACY)}
    config.tier_privacy = {
        t: max((c.privacy_of(t) for c in configs if t in c.tiers), key=strictness.__getitem__) for t in tiers
    }
    config.tier_inertia = {t: next(c.inertia_of(t) for c in configs if t in c.tiers) for t in tiers}
    config.target_modules = set(modules)
    config.exclude_modules = None
    config.layers_to_transform = None
    config.layers_pattern = None
    config.modules_to_save = None
    config._validate()
    return config


@torch.no_grad()
def _write_tier(layer, adapter_name, tier, parts, combination_type) -> None:
    """Set tier `tier` of `adapter_name` on `layer` from `parts` = [(input adapter, weight, first "cat" column)]."""
    target_a = layer.dynamic_lora_A[adapter_name][tier]
    target_b = layer.dynamic_lora_B[adapter_name][tier]
    scaling = layer.tier_scalings[adapter_name][tier]
    # Unused rank columns keep their fresh A and get B = 0: they change nothing and stay trainable.
    factor_a = target_a.detach().float().clone()
    factor_b = torch.zeros_like(target_b, dtype=torch.float32)
    if combination_type == "cat":
        for source, weight, start in parts:
            rank = layer.tier_ranks[source][tier]
            ratio = weight * layer.tier_scalings[source][tier] / scaling
            factor_a[start:start + rank] = layer.dynamic_lora_A[source][tier].float()
            factor_b[:, start:start + rank] = ratio * layer.dynamic_lora_B[source][tier].float()
    elif combination_type == "linear":
        if parts:
            factor_a.zero_()
        for source, weight, _ in parts:
            # PEFT's linear combination: sqrt(|c|) on both factors and the sign on A, per adapter
            ratio = weight * layer.tier_scalings[source][tier] / scaling
            root = math.sqrt(abs(ratio))
            factor_a += math.copysign(root, ratio) * layer.dynamic_lora_A[source][tier].float()
            factor_b += root * layer.dynamic_lora_B[source][tier].float()
    elif parts:  # svd
        delta = sum(weight * layer.tier_delta_weight(source, tier).float() for source, weight, _ in parts)
        left, singular, right = torch.linalg.svd(delta, full_matrices=False)
        kept = min(target_a.shape[0], singular.numel())
        root = singular[:kept].sqrt()
        # balanced split, so that both factors have the same scale if the adapter is trained further
        factor_a[:kept] = root[:, None] * right[:kept]
        factor_b[:, :kept] = left[:, :kept] * root / scaling
    target_a.copy_(factor_a.to(target_a.dtype))
    target_b.copy_(factor_b.to(target_b.dtype))


def add_weighted_adapter(
    tuner: "DynamicLoraModel",
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: Optional[Union[int, dict[str, int]]] = None,
) -> None:
    """Add the DynamicLoRA adapter `adapter_name` whose change is sum_i weights[i] * (change of adapters[i]).

    The new adapter holds every tier that any input holds (slowest first) and adapts every module that any input
    adapts; tier t of it combines tier t of the inputs:

    - "cat": exact. Tier rank = sum of the inputs' ranks of that tier; A_t = [A_{1,t}; A_{2,t}; ...] and
      B_t = [c_1 B_{1,t}, c_2 B_{2,t}, ...] with c_i = w_i s_{i,t} / s_t (s: the tier scalings).
    - "svd": the truncated SVD U S V^T of sum_i w_i dW_{i,t}; A_t = sqrt(S) V^T, B_t = U sqrt(S) / s_t. Tier rank:
      `svd_rank` (an int for every tier, or a dict tier -> rank), by default the largest input rank of that tier.
      Exact when that rank is at least the rank of the sum (e.g. the sum of the inputs' ranks).
    - "linear": PEFT LoRA's factor-wise combination A_t = sum_i sign(c_i) sqrt(|c_i|) A_{i,t},
      B_t = sum_i sqrt(|c_i|) B_{i,t}: needs identical tier layouts; exact for one adapter only.

    Rank columns left over (an input that does not adapt a module, or an SVD of lower rank) keep a fresh A and get
    B = 0. The new adapter's config is the first input's with the combined tier layout; a tier is as private as its
    most private input (tier_privacy) and takes the base inertia of the first input that holds it. Its dynamics
    start from the combined factors (like a loaded adapter without a saved dynamics state). It is saved and loaded
    like any DynamicLoRA adapter. Combining adapters that train whole modules (modules_to_save) is refused.
    """
    adapters, weights = list(adapters), list(weights)
    _check_arguments(tuner, adapters, weights, adapter_name, combination_type, svd_rank)
    configs = [tuner.peft_config[a] for a in adapters]
    tiers = [t for t in KNOWN_TIERS if any(t in c.tiers for c in configs)]
    ranks = _tier_ranks(configs, tiers, combination_type, svd_rank)
    modules = sorted({name for a in adapters for name in tuner.adapter_layers(a)})
    tuner.peft_config[adapter_name] = _combined_config(tuner, configs, tiers, ranks, modules)
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
    except Exception:
        tuner.peft_config.pop(adapter_name, None)  # as PeftModel.add_adapter does; the error goes on
        raise
    for name, layer in tuner.adapter_layers(adapter_name).items():
        for tier in tiers:
            parts, start = [], 0
            for source, weight, config in zip(adapters, weights, configs):
                if tier not in config.tiers:
                    continue
                if source in layer.dynamic_lora_A:
                    parts.append((source, weight, start))
                start += config.rank_of(tier)  # the blocks of a "cat" tier sit at the same columns on every module
            _write_tier(layer, adapter_name, tier, parts, combination_type)
    tuner.dynamics(adapter_name).reset_references(tuner.adapter_layers(adapter_name))
