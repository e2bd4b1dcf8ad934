"""Algebra over adapters (task arithmetic) for PEFT LoRA and DynamicLoRA adapters.

Every operation reads adapters that live in one `PeftModel` and adds its result to the same model as a new, ordinary
adapter (the way PEFT's `add_weighted_adapter` does): it is activated with `set_adapter`, saved with
`save_pretrained(..., selected_adapters=[name])`, and `save_as_lora` writes any adapter as a plain PEFT LoRA folder.

Notation. On a module with base weight W0 (out x in) an adapter changes the weight by dW = sum_p B_p A_p over its
parts p (LoRA: one part with the scaling alpha / r folded into B; DynamicLoRA: one part per tier, s_t folded in).
The adapter as a whole is the vector of its dW over all adapted modules; <a, b> = sum_modules trace(dW_a^T dW_b).

- union(a_1..a_n; w) = sum_i w_i dW_i                              exact (factor concatenation, rank = sum of ranks)
- negate(a) = -dW_a                                                exact
- interpolate(a, b, t) = (1 - t) dW_a + t dW_b                     exact
- difference(a, b) = dW_a - dW_b                                   exact ("subtract")
- difference(a, b, mode="project") = (I - Q_b Q_b^T) dW_a          exact, Q_b: orthonormal basis of the column
  (output) space of dW_b on that module; side="input" uses dW_a (I - P_b P_b^T) with P_b the row (input) space,
  side="both" both. The result is orthogonal to b: <difference, b> = 0.
- intersection(a_1..a_n; w, density) = TIES merge of the dW_i, per module (per tier for DynamicLoRA): keep the
  `density` fraction of largest-magnitude entries of each dW_i, elect the sign of every entry as the sign of the sum
  of the kept entries, and average w_i dW_i over the adapters whose kept entry has that sign (disjoint mean); the
  merged matrix is then written at the result's rank by truncated SVD (the truncation error is reported).
- similarity(a, b): cosine = <a, b> / (|a| |b|); subspace overlap per module = ||U_a^T U_b||_F^2 / min(k_a, k_b) with
  U the orthonormal bases of the column spaces (k their ranks); the principal angles are arccos of the singular
  values of U_a^T U_b. Overlap 1 and all angles 0 for an adapter with itself.
- cluster(adapters): average-linkage agglomerative clustering on the distance 1 - cosine.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from transformers.pytorch_utils import Conv1D

from .dynamic_lora.export import write_lora_folder
from .dynamic_lora.layer import DynamicLoraLayer

DIFFERENCE_MODES = ("subtract", "project")
PROJECTION_SIDES = ("output", "input", "both")
MAJORITY_SIGN_METHODS = ("total", "frequency")
# singular values below this fraction of the largest one count as zero (numerical rank)
RANK_TOLERANCE = 1e-6


# ----- adapter parts: one independently scaled low-rank product B A on one module ---------------------------------
@dataclass
class AdapterPart:
    """One low-rank part of an adapter on one module: LoRA has one per module, DynamicLoRA one per tier."""

    layer: Any
    adapter: str
    tier: Optional[str]  # None for LoRA

    @property
    def rank(self) -> int:
        if self.tier is None:
            return self.layer.r[self.adapter]
        return self.layer.tier_ranks[self.adapter][self.tier]

    def _scaling(self) -> float:
        if self.tier is None:
            return self.layer.scaling[self.adapter]
        return self.layer.tier_scalings[self.adapter][self.tier]

    def _raw(self) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        if self.tier is None:
            return self.layer.lora_B[self.adapter].weight, self.layer.lora_A[self.adapter].weight
        return self.layer.dynamic_lora_B[self.adapter][self.tier], self.layer.dynamic_lora_A[self.adapter][self.tier]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float32 with the scaling folded into B: the part changes the weight by B @ A (out x in)."""
        factor_b, factor_a = self._raw()
        return self._scaling() * factor_b.detach().float(), factor_a.detach().float()

    @torch.no_grad()
    def write(self, factor_b: torch.Tensor, factor_a: torch.Tensor) -> None:
        """Set the part to B @ A (scaling folded into `factor_b`); unused rank columns get B = 0, A = 0."""
        target_b, target_a = self._raw()
        kept = factor_b.shape[1]
        if kept > self.rank:
            raise ValueError(f"a part of rank {self.rank} cannot hold a product of rank {kept}.")
        new_b = torch.zeros_like(target_b, dtype=torch.float32)
        new_a = torch.zeros_like(target_a, dtype=torch.float32)
        new_b[:, :kept] = factor_b / self._scaling()
        new_a[:kept] = factor_a
        target_b.copy_(new_b.to(target_b.dtype))
        target_a.copy_(new_a.to(target_a.dtype))


def _tuner(model):
    """The BaseTuner (LoraModel or DynamicLoraModel) of a PeftModel, or the tuner itself."""
    from peft import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


def adapter_kind(model, adapter: str) -> str:
    """"LORA" or "DYNAMIC_LORA"; any other PEFT method is refused with the allowed values."""
    tuner = _tuner(model)
    if adapter not in tuner.peft_config:
        raise ValueError(f"adapter {adapter!r} does not exist; adapters: {sorted(tuner.peft_config)}.")
    kind = str(getattr(tuner.peft_config[adapter].peft_type, "value", tuner.peft_config[adapter].peft_type))
    if kind not in ("LORA", "DYNAMIC_LORA"):
        raise ValueError(f"adapter {adapter!r} is a {kind} adapter; the algebra supports LORA and DYNAMIC_LORA.")
    return kind


def adapter_parts(model, adapter: str) -> dict[str, list[AdapterPart]]:
    """Module name (relative to the transformers model) -> the parts of `adapter` on it."""
    from peft.tuners.lora import LoraLayer

    kind = adapter_kind(model, adapter)
    parts: dict[str, list[AdapterPart]] = {}
    for name, module in _tuner(model).model.named_modules():
        if kind == "DYNAMIC_LORA" and isinstance(module, DynamicLoraLayer) and adapter in module.dynamic_lora_A:
            parts[name] = [AdapterPart(module, adapter, tier) for tier in module.tier_names[adapter]]
        elif kind == "LORA" and isinstance(module, LoraLayer) and adapter in module.lora_A:
            if module.use_dora.get(adapter, False) or adapter in getattr(module, "lora_embedding_A", {}):
                raise ValueError(f"adapter {adapter!r} on {name} is DoRA or an embedding LoRA: not supported.")
            parts[name] = [AdapterPart(module, adapter, None)]
    if not parts:
        raise ValueError(f"adapter {adapter!r} adapts no module.")
    return parts


def module_factors(model, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (B, A), float32, with dW = B @ A (out x in): the parts concatenated."""
    result = {}
    for name, parts in adapter_parts(model, adapter).items():
        factors = [part.factors() for part in parts]
        result[name] = (torch.cat([b for b, _ in factors], dim=1), torch.cat([a for _, a in factors], dim=0))
    return result


def delta_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """Module name -> the full weight change dW (out x in, float32) of `adapter` (forms the full matrices)."""
    return {name: b @ a for name, (b, a) in module_factors(model, adapter).items()}


def low_rank_svd(factor_b: torch.Tensor, factor_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U S Vh of B @ A without forming it: QR of both factors, SVD of the small core R_B R_A^T."""
    q_b, r_b = torch.linalg.qr(factor_b)
    q_a, r_a = torch.linalg.qr(factor_a.T)
    left, singular, right = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ left, singular, right @ q_a.T


def numerical_rank(singular: torch.Tensor) -> int:
    if singular.numel() == 0 or singular[0] <= 0:
        return 0
    return int((singular > RANK_TOLERANCE * singular[0]).sum())


# ----- checks -----------------------------------------------------------------------------------------------------
def _check_new_name(model, adapter_name: str) -> None:
    tuner = _tuner(model)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
    if "." in adapter_name:
        raise ValueError(f"adapter_name must not contain '.' (it becomes a torch module name), got {adapter_name!r}.")
    if adapter_name in tuner.peft_config:
        # PEFT's LoRA add_weighted_adapter returns silently on an existing name: say it instead
        raise ValueError(f"adapter_name {adapter_name!r} is already taken (adapters: {sorted(tuner.peft_config)}).")


def _check_inputs(model, adapters: Sequence[str], weights: Optional[Sequence[float]]) -> tuple[list[str], list[float], str]:
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters must name at least one adapter.")
    kinds = {adapter_kind(model, a) for a in adapters}
    if len(kinds) != 1:
        raise ValueError(f"adapters must all be LORA or all DYNAMIC_LORA, got {sorted(kinds)}.")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"weights must hold one weight per adapter: {len(weights)} weights for {len(adapters)} adapters.")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}.")
    return adapters, weights, kinds.pop()


# ----- exact operations: weighted sums through the tuners' own add_weighted_adapter ("cat") ----------------------
def union(model, adapters: Sequence[str], adapter_name: str, weights: Optional[Sequence[float]] = None) -> dict:
    """Add `adapter_name` = sum_i weights[i] * adapters[i] (default weights 1), exactly (rank = sum of ranks)."""
    _check_new_name(model, adapter_name)
    adapters, weights, kind = _check_inputs(model, adapters, weights)
    tuner = _tuner(model)
    tuner.add_weighted_adapter(adapters, weights, adapter_name, combination_type="cat")
    if kind == "LORA":
        _write_lora_concatenation(model, adapters, weights, adapter_name)
    return {"adapter": adapter_name, "operation": "union", "inputs": adapters, "weights": weights,
            "relative_truncation_error": 0.0}


@torch.no_grad()
def _write_lora_concatenation(model, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Set the LoRA adapter `adapter_name` to B = [w_1 B_1, ...], A = [A_1; ...] (scalings folded, so exact).

    PEFT's LoRA "cat" builds the right layout but writes factors that are exact only when the new adapter's scaling
    is 1: with use_rslora it is alpha / sqrt(r) = sqrt(r), and a single adapter goes through "linear" instead.
    """
    inputs = {a: adapter_parts(model, a) for a in adapters}
    for name, parts in adapter_parts(model, adapter_name).items():
        factors = [(weight * b, a) for adapter, weight in zip(adapters, weights) if name in inputs[adapter]
                   for b, a in [inputs[adapter][name][0].factors()]]
        parts[0].write(torch.cat([b for b, _ in factors], dim=1), torch.cat([a for _, a in factors], dim=0))


def negate(model, adapter: str, adapter_name: str) -> dict:
    """Add `adapter_name` = -adapter (avoidance: activating it moves the model away from what `adapter` learned)."""
    report = union(model, [adapter], adapter_name, [-1.0])
    report["operation"] = "negate"
    return report


complement = negate


def interpolate(model, first: str, second: str, t: float, adapter_name: str) -> dict:
    """Add `adapter_name` = (1 - t) first + t second; t in [0, 1] interpolates, outside extrapolates."""
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"t must be a finite number, got {t!r}.")
    report = union(model, [first, second], adapter_name, [1.0 - t, float(t)])
    report["operation"] = "interpolate"
    return report


@torch.no_grad()
def difference(model, first: str, second: str, adapter_name: str, mode: str = "subtract",
               side: str = "output") -> dict:
    """Add `adapter_name` = first - second ("subtract") or first with second's subspace projected out ("project").

    "project" removes from every module's change of `first` its component in the column space of `second`'s change
    there (side="output"), in its row space (side="input") or both; modules that `second` does not adapt keep
    `first` unchanged. The result has the rank and layout of `first`.
    """
    if mode not in DIFFERENCE_MODES:
        raise ValueError(f"mode must be one of {list(DIFFERENCE_MODES)}, got {mode!r}.")
    if side not in PROJECTION_SIDES:
        raise ValueError(f"side must be one of {list(PROJECTION_SIDES)}, got {side!r}.")
    if mode == "subtract":
        report = union(model, [first, second], adapter_name, [1.0, -1.0])
        report["operation"] = "difference"
        return report
    _check_inputs(model, [first, second], None)
    removed = module_factors(model, second)
    union(model, [first], adapter_name, [1.0])
    for name, parts in adapter_parts(model, adapter_name).items():
        if name not in removed:
            continue
        left, singular, right = low_rank_svd(*removed[name])
        kept = numerical_rank(singular)
        output_basis, input_basis = left[:, :kept], right[:kept].T
        for part in parts:
            factor_b, factor_a = part.factors()
            if side in ("output", "both"):
                factor_b = factor_b - output_basis @ (output_basis.T @ factor_b)
            if side in ("input", "both"):
                factor_a = factor_a - (factor_a @ input_basis) @ input_basis.T
            part.write(factor_b, factor_a)
    return {"adapter": adapter_name, "operation": "difference", "mode": mode, "side": side,
            "inputs": [first, second], "relative_truncation_error": 0.0}


@torch.no_grad()
def intersection(model, adapters: Sequence[str], adapter_name: str, weights: Optional[Sequence[float]] = None,
                 density: float = 0.2, rank: Optional[int] = None, majority_sign_method: str = "total") -> dict:
    """Add `adapter_name` = TIES merge (trim to `density`, elect sign, disjoint mean) of the adapters, per module
    (per tier for DynamicLoRA, so that every tier keeps its meaning), written at `rank` by truncated SVD.

    `rank` (default: the largest input rank, per tier for DynamicLoRA) bounds the result; the relative Frobenius
    error of that truncation over all modules is reported as `relative_truncation_error`.
    """
    from peft.utils.merge_utils import ties

    _check_new_name(model, adapter_name)
    adapters, weights, kind = _check_inputs(model, adapters, weights)
    if len(adapters) < 2:
        raise ValueError(f"intersection needs at least two adapters, got {adapters}.")
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}.")
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {list(MAJORITY_SIGN_METHODS)}, got {majority_sign_method!r}.")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ValueError(f"rank must be None or a positive int, got {rank!r}.")
    _add_layout(model, adapters, weights, adapter_name, rank)  # its factors are replaced below
    inputs = {a: adapter_parts(model, a) for a in adapters}
    dropped, total = 0.0, 0.0
    for name, parts in adapter_parts(model, adapter_name).items():
        for part in parts:
            deltas, used = [], []
            for adapter, weight in zip(adapters, weights):
                source = [p for p in inputs[adapter].get(name, []) if p.tier == part.tier]
                if source:
                    factor_b, factor_a = source[0].factors()
                    deltas.append(factor_b @ factor_a)
                    used.append(weight)
            if not deltas:
                part.write(torch.zeros(part.layer.out_features, 0), torch.zeros(0, part.layer.in_features))
                continue
            merged = ties(deltas, torch.tensor(used), float(density), majority_sign_method)
            left, singular, right = torch.linalg.svd(merged, full_matrices=False)
            kept = min(part.rank, singular.numel())
            part.write(left[:, :kept] * singular[:kept], right[:kept])
            dropped += float((singular[kept:] ** 2).sum())
            total += float((singular ** 2).sum())
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    return {"adapter": adapter_name, "operation": "intersection", "inputs": adapters, "weights": weights,
            "density": density, "relative_truncation_error": error}


def _add_layout(model, adapters: list[str], weights: list[float], adapter_name: str, rank: Optional[int]) -> None:
    """Add `adapter_name` adapting every module any input adapts, at `rank` (default: the largest input rank; per
    tier for DynamicLoRA); the factors are written afterwards.

    LoRA: a copy of the first input's config (PEFT's add_weighted_adapter does the same, but its "svd" would also
    factorise every weighted sum, which the caller replaces). DynamicLoRA: its "svd" combination, which keeps the
    tier layout and privacy rules in one place.
    """
    tuner = _tuner(model)
    if adapter_kind(model, adapters[0]) == "DYNAMIC_LORA":
        tuner.add_weighted_adapter(adapters, weights, adapter_name, combination_type="svd", svd_rank=rank)
        return
    from dataclasses import replace

    configs = [tuner.peft_config[a] for a in adapters]
    largest = max(max([c.r, *c.rank_pattern.values()]) for c in configs)
    modules = sorted({name for a in adapters for name in adapter_parts(model, a)})
    new_rank = rank or largest
    config = replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=modules, rank_pattern={},
                     alpha_pattern={}, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
                     modules_to_save=None, use_rslora=False, use_dora=False, inference_mode=True)
    model.add_adapter(adapter_name, config)


# ----- similarity and clustering ----------------------------------------------------------------------------------
def _inner(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> float:
    """trace((B1 A1)^T (B2 A2)) = sum((B1^T B2) * (A1 A2^T)) without forming the products."""
    (b1, a1), (b2, a2) = first, second
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


@torch.no_grad()
def similarity(model, first: str, second: str) -> dict:
    """Cosine of the two adapters' changes over all modules, and the overlap and principal angles (degrees) of their
    column spaces per module shared by both. Modules adapted by one only count in the norms (they lower the cosine)."""
    factors_first, factors_second = module_factors(model, first), module_factors(model, second)
    inner = sum(_inner(factors_first[n], factors_second[n]) for n in factors_first if n in factors_second)
    norm_first = math.sqrt(sum(_inner(f, f) for f in factors_first.values()))
    norm_second = math.sqrt(sum(_inner(f, f) for f in factors_second.values()))
    cosine = inner / (norm_first * norm_second) if norm_first > 0 and norm_second > 0 else 0.0
    overlaps, angles = {}, {}
    for name in factors_first:
        if name not in factors_second:
            continue
        left_first, singular_first, _ = low_rank_svd(*factors_first[name])
        left_second, singular_second, _ = low_rank_svd(*factors_second[name])
        rank_first, rank_second = numerical_rank(singular_first), numerical_rank(singular_second)
        if min(rank_first, rank_second) == 0:
            continue
        cosines = torch.linalg.svdvals(left_first[:, :rank_first].T @ left_second[:, :rank_second]).clamp(max=1.0)
        overlaps[name] = float((cosines ** 2).sum()) / min(rank_first, rank_second)
        angles[name] = torch.rad2deg(torch.arccos(cosines)).tolist()
    mean_overlap = sum(overlaps.values()) / len(overlaps) if overlaps else 0.0
    return {"cosine": cosine, "subspace_overlap": mean_overlap, "module_overlap": overlaps, "principal_angles": angles}


def similarity_matrix(model, adapters: Sequence[str]) -> torch.Tensor:
    """n x n matrix of the adapters' cosine similarities."""
    adapters = list(adapters)
    matrix = torch.eye(len(adapters), dtype=torch.float64)
    for i in range(len(adapters)):
        for j in range(i + 1, len(adapters)):
            matrix[i, j] = matrix[j, i] = similarity(model, adapters[i], adapters[j])["cosine"]
    return matrix


def cluster(model, adapters: Sequence[str], threshold: float = 0.5, n_clusters: Optional[int] = None) -> dict:
    """Average-linkage agglomerative clustering with distance 1 - cosine.

    Merging stops at `n_clusters` clusters if given, else when the closest two clusters are further apart than
    `threshold`. Returns {"labels": adapter -> cluster id (0.. in order of first appearance), "similarity": matrix}.
    """
    adapters = list(adapters)
    if len(adapters) < 1:
        raise ValueError("adapters must name at least one adapter.")
    if n_clusters is not None and not (isinstance(n_clusters, int) and 1 <= n_clusters <= len(adapters)):
        raise ValueError(f"n_clusters must be None or an int in [1, {len(adapters)}], got {n_clusters!r}.")
    if not 0 <= threshold <= 2:
        raise ValueError(f"threshold must be a distance 1 - cosine in [0, 2], got {threshold!r}.")
    sim = similarity_matrix(model, adapters)
    distance = 1.0 - sim
    groups = [[i] for i in range(len(adapters))]
    while len(groups) > 1:
        if n_clusters is not None and len(groups) <= n_clusters:
            break
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                linkage = float(distance[groups[i]][:, groups[j]].mean())
                if best is None or linkage < best[0]:
                    best = (linkage, i, j)
        if n_clusters is None and best[0] > threshold:
            break
        _, i, j = best
        groups[i] = groups[i] + groups.pop(j)
    groups.sort(key=min)
    labels = {adapters[i]: label for label, group in enumerate(groups) for i in group}
    return {"labels": labels, "similarity": sim.tolist(), "adapters": adapters}


# ----- export -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def save_as_lora(model, adapter: str, save_directory: str, rank: Optional[int] = None) -> dict:
    """Write `adapter` (LoRA or DynamicLoRA) as a plain PEFT LoRA folder of rank `rank`.

    rank=None keeps it exact: r is the largest numerical rank over the modules (e.g. a union of a and -a has rank 0
    numerically). A smaller rank truncates every module's change by SVD; the report gives the relative Frobenius
    error over all modules (`relative_truncation_error`) and the worst module's.
    """
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise ValueError(f"rank must be None or a positive int, got {rank!r}.")
    factors = module_factors(model, adapter)
    decompositions = {name: low_rank_svd(b, a) for name, (b, a) in factors.items()}
    exact_rank = max(max(numerical_rank(s) for _, s, _ in decompositions.values()), 1)
    target_rank = exact_rank if rank is None else rank
    state, dropped, total, worst = {}, 0.0, 0.0, 0.0
    for name, (left, singular, right) in decompositions.items():
        kept = min(target_rank, singular.numel())
        factor_b = torch.zeros(left.shape[0], target_rank)
        factor_a = torch.zeros(target_rank, right.shape[1])
        factor_b[:, :kept] = left[:, :kept] * singular[:kept]
        factor_a[:kept] = right[:kept]
        lost, whole = float((singular[kept:] ** 2).sum()), float((singular ** 2).sum())
        dropped, total = dropped + lost, total + whole
        worst = max(worst, math.sqrt(lost / whole) if whole > 0 else 0.0)
        state[f"base_model.model.{name}.lora_A.weight"] = factor_a.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = factor_b.contiguous()
    tuner = _tuner(model)
    config = tuner.peft_config[adapter]
    # GPT-2's Conv1D stores its weight as (in, out): PEFT LoRA then needs fan_in_fan_out (the factors keep B @ A)
    transposed = any(isinstance(parts[0].layer.get_base_layer(), Conv1D) for parts in adapter_parts(model, adapter).values())
    write_lora_folder(
        save_directory, state, rank=target_rank, target_modules=sorted(factors), fan_in_fan_out=transposed,
        task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path, revision=config.revision,
    )
    return {"adapter": adapter, "directory": os.fspath(save_directory), "rank": target_rank, "exact_rank": exact_rank,
            "relative_truncation_error": math.sqrt(dropped / total) if total > 0 else 0.0,
            "worst_module_truncation_error": worst}
