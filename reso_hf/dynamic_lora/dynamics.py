"""The per-adapter dynamics of DynamicLoRA (SPEC §5.2-§5.7, with the changes of docs/dynamic_lora.md): one
`AdapterDynamics` per adapter.

`AdapterDynamics.step(layers, ...)` runs once after every optimizer step, in this order:

1. non-finite check: NaN/Inf in any tier -> CRITICAL, every tier is restored to the last good values
   (the anchors of the previous step), non-finite optimizer state of the factors is zeroed, step ends;
2. interaction density rho_t (agents sharing the tier x gradient norm) and effective inertia alpha_eff,t;
3. vertical resonance: cosine v between each fast tier's realised update and the next slower tier's dW (kept per
   module in `vertical_cosines`); conflicts (v < -conflict_threshold) damp the fast tier's update by (1 - delta |v|);
4. importance damping (importance_damping > 0): u <- u / (1 + lambda I / mean I); then inertia:
   theta <- theta_old + (1 - alpha_eff) * damping * u, u = theta_new - theta_old;
5. importance EMA, SCREENED/FREE phases with hysteresis, homeostasis of tau, two-rate decay toward init; after a
   consolidation, each fast tier's change over the step is projected off the protected subspaces;
6. every `effective_autocorr_window` steps: subspace autocorrelation, stability counters, migration requests and
   vertical fast-tracks;
7. one tick of the bandwidth queue: admitted migrations run (each with a rollback point);
8. horizontal resonance across ranks (optional);
9. anchors <- current values (the reference of the next realised update); health.

`AdapterDynamics.consolidate(layers)` runs at task or session boundaries (see .consolidation).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from .config import DynamicLoraConfig
from .consolidation import fold_into_memory, remove_column_component, remove_row_component
from .migration import (
    MigrationQueue,
    RollbackRing,
    migrate_pattern,
    subspace_autocorrelation,
    top_subspace,
)
from .resonance import (
    average_all_reduce,
    distributed_world,
    resonance_all_reduce,
    update_cosine,
)

if TYPE_CHECKING:
    from .layer import DynamicLoraLayer

HEALTH_STATES = ("HEALTHY", "ACCEPTABLE", "DEGRADED", "CRITICAL")
# how often each mechanism acted (conflicts: steps on which a fast tier's update was damped by vertical resonance)
EMPTY_COUNTERS = {
    "migrations": 0,
    "fast_tracks": 0,
    "rollbacks": 0,
    "nonfinite_rollbacks": 0,
    "threshold_changes": 0,
    "rejected_migrations": 0,
    "conflicts": 0,
    "consolidations": 0,
}
FACTOR_FIELDS = ("A", "B")
# per (module, tier) tensors that are part of the saved dynamics state
MODULE_TENSOR_FIELDS = (
    "init_A",
    "init_B",
    "anchor_A",
    "anchor_B",
    "importance_A",
    "importance_B",
    "screened_A",
    "screened_B",
)


@dataclass
class ModuleTierState:
    """Dynamics state of one tier on one module."""

    tensors: dict[str, torch.Tensor]
    subspace: Optional[torch.Tensor] = None  # top-k left singular subspace at the last window (out x k)
    stable_count: int = 0
    last_autocorr: float = 0.0


@dataclass
class TierState:
    """Dynamics state of one tier over all modules."""

    base_inertia: float
    threshold: float  # tau
    grad_norm_ema: float = 0.0
    grad_norm_seen: bool = False
    density: float = 1.0
    alpha_eff: float = 0.0
    screened_fraction: float = 0.0
    vertical: float = 0.0  # cosine of this tier's update with the next slower tier's dW (last step)
    vertical_ema: float = 0.0
    damping: float = 1.0
    horizontal_alignment: float = 0.0
    horizontal_weight: float = 1.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _level(value: float, healthy: float, factors: tuple[float, float]) -> int:
    """0 healthy, 1 acceptable, 2 degraded, 3 critical for an upper-bounded metric."""
    if value < healthy:
        return 0
    if value < healthy * factors[0]:
        return 1
    if value < healthy * factors[1]:
        return 2
    return 3


class AdapterDynamics:
    """All dynamics state of one adapter; operates on the adapter's layers passed to each call."""

    def __init__(self, config: DynamicLoraConfig, adapter_name: str, layers: dict[str, "DynamicLoraLayer"]):
        self.config = config
        self.adapter_name = adapter_name
        self.tiers: list[str] = list(config.tiers)
        self.step_count = 0
        self.tier_states: dict[str, TierState] = {
            t: TierState(base_inertia=config.inertia_of(t), threshold=config.screening_threshold,
                         alpha_eff=config.inertia_of(t))
            for t in self.tiers
        }
        self.module_states: dict[str, dict[str, ModuleTierState]] = {}
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.reset_references(layers)
        tier_parameters = {t: 0 for t in self.tiers}
        for layer in layers.values():
            for tier in self.tiers:
                tier_parameters[tier] += layer.tier_ranks[adapter_name][tier] * (layer.in_features + layer.out_features)
        self.tier_parameters = tier_parameters
        budgets = {t: config.effective_bandwidth_of(t) * tier_parameters[t] for t in self.tiers[1:]}
        self.queue = MigrationQueue(
            budgets=budgets,
            refill=config.bandwidth_refill,
            aging=config.queue_aging,
            max_size=config.max_queue_size,
            emergency_criticality=config.emergency_criticality,
        )
        self.ring = RollbackRing(config.rollback_capacity)
        self.audit: deque[dict] = deque(maxlen=config.audit_log_capacity)
        self.health_counts: dict[str, int] = {s: 0 for s in HEALTH_STATES}
        self.recent_truncation: deque[float] = deque(maxlen=20)
        self.conflict_history: deque[int] = deque(maxlen=100)
        self.counters: dict[str, int] = dict(EMPTY_COUNTERS)
        # module -> {"column": out x k, "row": in x k}: orthonormal bases of the memory tiers' delta W recorded by
        # the last consolidate(); the fast tiers' updates are kept off them (config.protected_subspace)
        self.protected: dict[str, dict[str, torch.Tensor]] = {}
        # "slow->fast" -> {module: cosine of the fast tier's last realised update with the slow tier's delta W}
        self.vertical_cosines: dict[str, dict[str, float]] = {}
        self.last_nonfinite_step: int = -1
        self.last_metrics: dict[str, Any] = {}
        self.provenance_fn = None  # set by the tuner: callable returning the current provenance hash

    # ----- references ----------------------------------------------------------------------------------
    def reset_references(self, layers: dict[str, "DynamicLoraLayer"], incoming: Optional[dict] = None) -> None:
        """(Re)build per-module state with init = anchor = the current (or incoming) factor values.

        `incoming`: factors about to be loaded, keyed by `factor_key(module, tier, "A"|"B")`.
        """
        self.module_states = {}
        self.module_shapes = {}
        for name, layer in layers.items():
            self.module_shapes[name] = (layer.out_features, layer.in_features)
            per_tier = {}
            for tier in self.tiers:
                factor_a = layer.dynamic_lora_A[self.adapter_name][tier].detach()
                factor_b = layer.dynamic_lora_B[self.adapter_name][tier].detach()
                if incoming is not None:
                    factor_a = incoming.get(factor_key(name, tier, "A"), factor_a).detach()
                    factor_b = incoming.get(factor_key(name, tier, "B"), factor_b).detach()
                device = layer.dynamic_lora_A[self.adapter_name][tier].device
                factor_a = factor_a.to(device)
                factor_b = factor_b.to(device)
                per_tier[tier] = ModuleTierState(
                    tensors={
                        "init_A": factor_a.clone(),
                        # dW = 0 at B = 0 whatever A is: decay pulls toward the no-change state
                        "init_B": torch.zeros_like(factor_b),
                        "anchor_A": factor_a.clone(),
                        "anchor_B": factor_b.clone(),
                        "importance_A": torch.zeros_like(factor_a),
                        "importance_B": torch.zeros_like(factor_b),
                        "screened_A": torch.zeros_like(factor_a, dtype=torch.bool),
                        "screened_B": torch.zeros_like(factor_b, dtype=torch.bool),
                    }
                )
            self.module_states[name] = per_tier

    # ----- helpers -------------------------------------------------------------------------------------
    def _factor(self, layer: "DynamicLoraLayer", tier: str, which: str) -> torch.nn.Parameter:
        container = layer.dynamic_lora_A if which == "A" else layer.dynamic_lora_B
        return container[self.adapter_name][tier]

    def _state_tensor(self, state: ModuleTierState, key: str, like: torch.Tensor) -> torch.Tensor:
        tensor = state.tensors[key]
        if tensor.device != like.device:
            tensor = tensor.to(like.device)
            state.tensors[key] = tensor
        return tensor

    def record(self, event: str, **details: Any) -> dict:
        entry = {"step": self.step_count, "event": event, "adapter": self.adapter_name, **details}
        self.audit.append(entry)
        return entry

    def _check_layout(self, layers: dict[str, "DynamicLoraLayer"]) -> None:
        if set(layers) != set(self.module_states):
            missing = sorted(set(self.module_states) - set(layers))
            extra = sorted(set(layers) - set(self.module_states))
            raise RuntimeError(
                f"The adapted modules of adapter {self.adapter_name!r} changed since the dynamics state was built "
                f"(missing: {missing[:5]}, new: {extra[:5]})."
            )

    # ----- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self,
        layers: dict[str, "DynamicLoraLayer"],
        optimizer: Optional[torch.optim.Optimizer] = None,
        allow_missing_gradients: bool = False,
    ) -> dict[str, Any]:
        config = self.config
        self._check_layout(layers)
        self.step_count += 1
        metrics: dict[str, Any] = {"step": self.step_count}

        # 1. non-finite values: restore the last good point (the anchors) and stop here
        # a NaN or Inf anywhere makes the sum non-finite (one pass, no boolean copy of the factor)
        bad_tiers = sorted(
            {
                tier
                for layer in layers.values()
                for tier in self.tiers
                for which in FACTOR_FIELDS
                if not math.isfinite(float(self._factor(layer, tier, which).detach().sum()))
            },
            key=self.tiers.index,
        )
        if bad_tiers:
            self._restore_anchors(layers)
            sanitized = self._sanitize_optimizer(layers, optimizer)
            self.counters["nonfinite_rollbacks"] += 1
            self.last_nonfinite_step = self.step_count
            self.record("nonfinite_rollback", tiers=bad_tiers, sanitized_optimizer_tensors=sanitized,
                        provenance=self._provenance())
            metrics.update(self._health_metrics(nonfinite=True))
            self.last_metrics = metrics
            return metrics

        # 2. gradients -> interaction density -> effective inertia
        grad_sq = {t: 0.0 for t in self.tiers}
        seen_gradient = False
        for layer in layers.values():
            for tier in self.tiers:
                for which in FACTOR_FIELDS:
                    grad = self._factor(layer, tier, which).grad
                    if grad is not None:
                        seen_gradient = True
                        grad_sq[tier] += float(torch.linalg.vector_norm(grad, dtype=torch.float32)) ** 2
        if not seen_gradient and not allow_missing_gradients:
            raise RuntimeError(
                "dynamic_step() found no gradient on any DynamicLoRA factor. Call it after optimizer.step() and "
                "before optimizer.zero_grad() (DynamicLoraCallback does this under Trainer), or pass "
                "allow_missing_gradients=True to run the dynamics without gradient information."
            )
        active, world_size, _ = distributed_world()
        raw_density = {}
        for tier in self.tiers:
            state = self.tier_states[tier]
            norm = math.sqrt(grad_sq[tier])
            if state.grad_norm_seen:
                state.grad_norm_ema = config.density_ema_beta * state.grad_norm_ema + (1 - config.density_ema_beta) * norm
            else:
                state.grad_norm_ema = norm
                state.grad_norm_seen = seen_gradient
            agents = world_size if (active and config.scope_of(tier) in ("shared", "swarm")) else 1
            # 'delta_w': ||dL/d dW_t|| is the same for every tier (all tiers adapt the same modules) and cancels
            raw_density[tier] = agents * (state.grad_norm_ema if config.density_gradient == "factors" else 1.0)
        mean_density = sum(raw_density.values()) / len(raw_density)
        for tier in self.tiers:
            state = self.tier_states[tier]
            state.density = raw_density[tier] / mean_density if mean_density > 0 else 1.0
            state.alpha_eff = state.base_inertia + (1 - state.base_inertia) * math.tanh(
                config.density_coupling * max(0.0, state.density - 1.0)
            )

        # 3. vertical resonance between neighbouring tiers (slow = tiers[i-1], fast = tiers[i])
        for tier in self.tiers:
            self.tier_states[tier].damping = 1.0
            self.tier_states[tier].vertical = 0.0
        self.vertical_cosines = {}
        window = config.effective_autocorr_window
        # the EMA behind fast-tracks averages over one pattern window (SPEC's 0.9 is a window of 10 steps)
        vertical_beta = 0.9 if config.dynamics_horizon is None else 1.0 - 1.0 / window
        if config.vertical_resonance:
            for index in range(1, len(self.tiers)):
                slow, fast = self.tiers[index - 1], self.tiers[index]
                cosines = []
                per_module = self.vertical_cosines.setdefault(f"{slow}->{fast}", {})
                for name, layer in layers.items():
                    fast_state = self.module_states[name][fast]
                    slow_state = self.module_states[name][slow]
                    new_a, new_b = self._factor(layer, fast, "A"), self._factor(layer, fast, "B")
                    inner, update_norm, slow_norm = update_cosine(
                        new_a,
                        new_b,
                        self._state_tensor(fast_state, "anchor_A", new_a),
                        self._state_tensor(fast_state, "anchor_B", new_b),
                        layer.tier_scalings[self.adapter_name][fast],
                        self._state_tensor(slow_state, "anchor_A", new_a),
                        self._state_tensor(slow_state, "anchor_B", new_b),
                        layer.tier_scalings[self.adapter_name][slow],
                    )
                    if update_norm > 0 and slow_norm > 0:
                        cosines.append(inner / (update_norm * slow_norm))
                        per_module[name] = cosines[-1]
                vertical = sum(cosines) / len(cosines) if cosines else 0.0
                fast_state_tier = self.tier_states[fast]
                fast_state_tier.vertical = vertical
                fast_state_tier.vertical_ema = vertical_beta * fast_state_tier.vertical_ema + (1 - vertical_beta) * vertical
                conflict = vertical < -config.conflict_threshold
                self.conflict_history.append(int(conflict))
                if conflict:
                    fast_state_tier.damping = 1.0 - config.conflict_damping * abs(vertical)
                    self.counters["conflicts"] += 1

        # 4. inertia on the realised update (with importance damping and protected subspaces); 5. importance, phases,
        # decay
        importance_mean = self._importance_means(layers) if config.importance_damping > 0 else {}
        protected_tiers = set(config.fast_tiers) if self.protected and config.protected_subspace != "none" else set()
        importance_sum = {t: 0.0 for t in self.tiers}
        element_count = {t: 0 for t in self.tiers}
        for name, layer in layers.items():
            for tier in self.tiers:
                tier_state = self.tier_states[tier]
                factor_scale = (1.0 - tier_state.alpha_eff) * tier_state.damping
                state = self.module_states[name][tier]
                for which in FACTOR_FIELDS:
                    param = self._factor(layer, tier, which)
                    anchor = self._state_tensor(state, f"anchor_{which}", param)
                    if importance_mean.get(tier, 0.0) > 0:
                        update = self._damped_update(param - anchor, tier, which, state, importance_mean[tier])
                        param.copy_(anchor + factor_scale * update)
                    elif factor_scale != 1.0:  # in place: theta_old + f (theta_new - theta_old)
                        param.sub_(anchor).mul_(factor_scale).add_(anchor)
                    grad = param.grad
                    importance = self._state_tensor(state, f"importance_{which}", param)
                    if grad is not None:
                        importance.mul_(config.importance_beta).add_(
                            (param * grad).abs().to(importance.dtype), alpha=1 - config.importance_beta
                        )
                    else:
                        importance.mul_(config.importance_beta)
                    importance_sum[tier] += float(importance.sum())
                    element_count[tier] += importance.numel()
        screened_count = {t: 0 for t in self.tiers}
        for name, layer in layers.items():
            for tier in self.tiers:
                tier_state = self.tier_states[tier]
                mean_importance = importance_sum[tier] / max(element_count[tier], 1)
                state = self.module_states[name][tier]
                for which in FACTOR_FIELDS:
                    param = self._factor(layer, tier, which)
                    importance = self._state_tensor(state, f"importance_{which}", param)
                    screened = self._state_tensor(state, f"screened_{which}", param)
                    if mean_importance > 0:
                        # I / mean > tau, written without dividing the whole tensor
                        enter = importance > tier_state.threshold * mean_importance
                        stay = importance >= config.hysteresis_ratio * tier_state.threshold * mean_importance
                        stay &= screened
                        screened.copy_(enter.logical_or_(stay))
                    else:
                        screened.zero_()
                    screened_count[tier] += int(screened.sum())
                    init = self._state_tensor(state, f"init_{which}", param)
                    # free_decay + screened * (screened_decay - free_decay), applied to theta - init
                    decay = screened.to(param.dtype).mul_(config.screened_decay - config.free_decay)
                    decay.add_(config.free_decay)
                    if config.decay_follows_inertia:
                        decay.mul_(1.0 - tier_state.alpha_eff)
                    param.sub_(decay.mul_(param - init))
                    if tier in protected_tiers:
                        # after the decay, whose per-element rates would tilt B out of the allowed subspace: the
                        # step's whole change of a fast tier is kept off the consolidated subspaces
                        anchor = self._state_tensor(state, f"anchor_{which}", param)
                        param.copy_(anchor + self._protected_update(param - anchor, name, which))
        changed = {}
        for tier in self.tiers:
            tier_state = self.tier_states[tier]
            tier_state.screened_fraction = screened_count[tier] / max(element_count[tier], 1)
            if importance_sum[tier] <= 0:
                continue  # no importance signal yet: homeostasis would only drift tau
            before = tier_state.threshold
            if tier_state.screened_fraction > config.homeostasis_upper:
                tier_state.threshold *= config.homeostasis_up_factor
            elif tier_state.screened_fraction < config.homeostasis_lower:
                tier_state.threshold *= config.homeostasis_down_factor
            if tier_state.threshold != before:
                changed[tier] = {"from": before, "to": tier_state.threshold,
                                 "screened_fraction": tier_state.screened_fraction}
        if changed:
            self.counters["threshold_changes"] += len(changed)
            self.record("threshold_change", tiers=sorted(changed, key=self.tiers.index), changes=changed)

        # 6. pattern detection and fast-tracks at window boundaries
        if self.step_count % window == 0:
            metrics["patterns"] = self.detect_patterns(layers)
            if config.vertical_resonance and config.migration_enabled:
                for index in range(1, len(self.tiers)):
                    slow, fast = self.tiers[index - 1], self.tiers[index]
                    if self.tier_states[fast].vertical_ema > config.vertical_threshold:
                        self.fast_track(layers, fast, slow)

        # 7. one tick of the bandwidth queue
        if config.migration_enabled:
            metrics["migrations_this_step"] = self.process_queue(layers, self.step_count)

        # 8. horizontal resonance across ranks
        if config.horizontal_resonance and active and world_size > 1:
            metrics["horizontal"] = self.synchronise_ranks(layers)

        # 9. anchors for the next step
        self._set_anchors(layers)
        metrics.update(self._health_metrics(nonfinite=False))
        self.last_metrics = metrics
        return metrics

    # ----- importance damping, protected subspaces, consolidation ------------------------------------------
    def _importance_means(self, layers: dict[str, "DynamicLoraLayer"]) -> dict[str, float]:
        """Mean importance per tier over all its elements (A and B of every module), before this step's update."""
        sums = {t: 0.0 for t in self.tiers}
        counts = {t: 0 for t in self.tiers}
        for name in layers:
            for tier in self.tiers:
                for which in FACTOR_FIELDS:
                    importance = self.module_states[name][tier].tensors[f"importance_{which}"]
                    sums[tier] += float(importance.sum())
                    counts[tier] += importance.numel()
        return {t: sums[t] / max(counts[t], 1) for t in self.tiers}

    def _damped_update(self, update: torch.Tensor, tier: str, which: str, state: ModuleTierState,
                       mean_importance: float) -> torch.Tensor:
        """u / (1 + lambda I / mean(I)): EWC-like, the elements that mattered most (§5.3 importance) move least."""
        importance = self._state_tensor(state, f"importance_{which}", update)
        return update / (1.0 + (self.config.importance_damping / mean_importance) * importance.to(update.dtype))

    def _protected_update(self, update: torch.Tensor, module: str, which: str) -> torch.Tensor:
        """A fast tier's update without (gamma times) its component in the consolidated subspaces of `module`."""
        config = self.config
        bases = self.protected.get(module)
        if bases is None:
            return update
        if which == "B" and config.protected_subspace in ("column", "both"):
            return remove_column_component(update, bases["column"], config.protection_strength)
        if which == "A" and config.protected_subspace in ("row", "both"):
            return remove_row_component(update, bases["row"], config.protection_strength)
        return update

    @torch.no_grad()
    def consolidate(self, layers: dict[str, "DynamicLoraLayer"], optimizer=None) -> dict[str, Any]:
        """Fold the fast tiers into the memory tiers on every module, re-initialise the fast tiers, record the
        memory's column and row spaces for protection (see .consolidation for the equations). Base weights are not
        touched. Returns the measured truncation errors."""
        config = self.config
        self._check_layout(layers)
        memory, fast = config.memory_tiers, config.fast_tiers
        if not fast:
            raise ValueError(
                f"consolidate() folds the fast tiers into the {config.consolidation_memory_tiers} slowest (memory) tiers, "
                f"but adapter {self.adapter_name!r} has only the tiers {self.tiers}: set "
                f"consolidation_memory_tiers below {len(self.tiers)}."
            )
        per_module: dict[str, dict[str, Any]] = {}
        error_sq, norm_sq = 0.0, 0.0
        for name, layer in layers.items():
            scalings = layer.tier_scalings[self.adapter_name]
            factors = {t: (self._factor(layer, t, "A"), self._factor(layer, t, "B"), scalings[t]) for t in self.tiers}
            result = fold_into_memory(factors, memory)
            if not all(torch.isfinite(t).all() for pair in result.memory_factors.values() for t in pair):
                raise FloatingPointError(f"consolidate(): non-finite factors on module {name!r}; nothing was changed "
                                         "on it (the adapter holds NaN or Inf?).")
            for tier, (new_a, new_b) in result.memory_factors.items():
                self._factor(layer, tier, "A").copy_(new_a)
                self._factor(layer, tier, "B").copy_(new_b)
            self.protected[name] = {"column": result.column_basis.detach().clone(),
                                    "row": result.row_basis.detach().clone()}
            for tier in fast:
                factor_a, factor_b = self._factor(layer, tier, "A"), self._factor(layer, tier, "B")
                fresh = torch.empty_like(factor_a)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))  # LoRA's initialisation of A
                if config.protected_subspace in ("row", "both"):
                    fresh = remove_row_component(fresh, result.row_basis, config.protection_strength)
                factor_a.copy_(fresh)
                factor_b.zero_()
            for tier in self.tiers:
                factor_a, factor_b = self._factor(layer, tier, "A"), self._factor(layer, tier, "B")
                state = self.module_states[name][tier]
                tensors = state.tensors
                tensors["init_A"] = factor_a.detach().clone()
                # memory tiers decay toward what was consolidated, fast tiers toward no change (B = 0)
                tensors["init_B"] = factor_b.detach().clone() if tier in memory else torch.zeros_like(factor_b)
                for which, factor in (("A", factor_a), ("B", factor_b)):
                    tensors[f"anchor_{which}"] = factor.detach().clone()
                    tensors[f"importance_{which}"] = torch.zeros_like(factor)
                    tensors[f"screened_{which}"] = torch.zeros_like(factor, dtype=torch.bool)
                state.subspace, state.stable_count, state.last_autocorr = None, 0, 0.0
            norm = result.truncation_error / result.relative_truncation_error if result.relative_truncation_error else 0.0
            error_sq += result.truncation_error ** 2
            norm_sq += norm ** 2
            per_module[name] = {"truncation_error": result.truncation_error,
                                "relative_truncation_error": result.relative_truncation_error,
                                "kept_rank": result.kept_rank}
        dropped_requests = len(self.queue.pending)
        self.queue.pending = []  # the patterns they named were folded away
        reset_optimizer_tensors = self._reset_optimizer(layers, optimizer)
        relative = [m["relative_truncation_error"] for m in per_module.values()]
        report = {
            "step": self.step_count,
            "memory_tiers": memory,
            "fast_tiers": fast,
            "modules": len(per_module),
            "truncation_error": math.sqrt(error_sq),
            "relative_truncation_error": math.sqrt(error_sq / norm_sq) if norm_sq > 0 else 0.0,
            "max_relative_truncation_error": max(relative) if relative else 0.0,
            "dropped_migration_requests": dropped_requests,
            "reset_optimizer_tensors": reset_optimizer_tensors,
        }
        self.counters["consolidations"] += 1
        self.record("consolidation", tiers=memory + fast, **{k: v for k, v in report.items() if k != "step"},
                    provenance=self._provenance())
        return {**report, "per_module": per_module}

    def _module_delta_norm(self, layer: "DynamicLoraLayer") -> float:
        """||sum_t s_t B_t A_t||_F of one module, from the factors' Gram matrices."""
        scalings = layer.tier_scalings[self.adapter_name]
        left = torch.cat([scalings[t] * self._factor(layer, t, "B").float() for t in self.tiers], dim=1)
        right = torch.cat([self._factor(layer, t, "A").float() for t in self.tiers], dim=0)
        return math.sqrt(max(float(((left.T @ left) * (right @ right.T)).sum()), 0.0))

    def _reset_optimizer(self, layers: dict[str, "DynamicLoraLayer"], optimizer) -> int:
        """Drop the optimizer state (e.g. Adam moments) of every factor: it describes factors that no longer exist."""
        if optimizer is None:
            return 0
        params = [
            getattr(self._factor(layer, tier, which), "sharded_source", self._factor(layer, tier, which))
            for layer in layers.values()
            for tier in self.tiers
            for which in FACTOR_FIELDS
        ]
        count = 0
        for param in params:
            if param in optimizer.state:
                del optimizer.state[param]
                count += 1
        return count

    # ----- anchors, optimizer --------------------------------------------------------------------------
    def _set_anchors(self, layers: dict[str, "DynamicLoraLayer"]) -> None:
        for name, layer in layers.items():
            for tier in self.tiers:
                state = self.module_states[name][tier]
                for which in FACTOR_FIELDS:
                    param = self._factor(layer, tier, which)
                    self._state_tensor(state, f"anchor_{which}", param).copy_(param.detach())

    def _restore_anchors(self, layers: dict[str, "DynamicLoraLayer"]) -> None:
        for name, layer in layers.items():
            for tier in self.tiers:
                state = self.module_states[name][tier]
                for which in FACTOR_FIELDS:
                    param = self._factor(layer, tier, which)
                    param.copy_(self._state_tensor(state, f"anchor_{which}", param))
                    if param.grad is not None:
                        param.grad.zero_()

    def _sanitize_optimizer(self, layers: dict[str, "DynamicLoraLayer"], optimizer) -> int:
        """Zero non-finite entries of the optimizer state of the factors, so that training can continue."""
        if optimizer is None:
            return 0
        params = {  # under FSDP the optimizer holds the shards of the whole factors seen here (see .sharding)
            id(getattr(self._factor(layer, tier, which), "sharded_source", self._factor(layer, tier, which)))
            for layer in layers.values()
            for tier in self.tiers
            for which in FACTOR_FIELDS
        }
        count = 0
        for param, state in optimizer.state.items():
            if id(param) not in params:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    value.copy_(torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0))
                    count += 1
        return count

    def _provenance(self) -> Optional[str]:
        return self.provenance_fn() if self.provenance_fn is not None else None

    # ----- patterns, migration -------------------------------------------------------------------------
    @torch.no_grad()
    def detect_patterns(self, layers: dict[str, "DynamicLoraLayer"]) -> dict[str, Any]:
        """Measure the subspace autocorrelation of every non-slowest tier; queue stable patterns."""
        config = self.config
        autocorr_by_tier: dict[str, list[float]] = {t: [] for t in self.tiers[1:]}
        submitted = 0
        for name, layer in layers.items():
            for index in range(1, len(self.tiers)):
                tier, target = self.tiers[index], self.tiers[index - 1]
                state = self.module_states[name][tier]
                factor_a, factor_b = self._factor(layer, tier, "A"), self._factor(layer, tier, "B")
                k = min(config.subspace_rank, factor_a.shape[0])
                subspace, norm = top_subspace(factor_b, factor_a, layer.tier_scalings[self.adapter_name][tier], k)
                if norm <= 1e-12:
                    state.subspace, state.stable_count, state.last_autocorr = None, 0, 0.0
                    continue
                if state.subspace is not None:
                    autocorr = subspace_autocorrelation(subspace, state.subspace.to(subspace.device))
                    state.last_autocorr = autocorr
                    state.stable_count = state.stable_count + 1 if autocorr >= config.stability_threshold else 0
                    autocorr_by_tier[tier].append(autocorr)
                state.subspace = subspace.detach().clone()
                if state.stable_count >= config.stable_windows and config.migration_enabled:
                    screened = self.module_states[name][tier].tensors
                    saturation = float(
                        (screened["screened_A"].sum() + screened["screened_B"].sum())
                        / (screened["screened_A"].numel() + screened["screened_B"].numel())
                    )
                    request = self.queue.submit(
                        module=name,
                        source=tier,
                        target=target,
                        priority=state.last_autocorr,
                        criticality=state.last_autocorr * saturation,
                        size=factor_a.shape[0] * (layer.in_features + layer.out_features),
                        tick=self.step_count,
                    )
                    if request is None:
                        self.counters["rejected_migrations"] += 1
                        self.record("migration_rejected", module=name, tiers=[tier, target],
                                    queue_depth=self.queue.depth)
                    else:
                        submitted += 1
                    state.stable_count = 0
        return {
            "autocorr": {t: (sum(v) / len(v) if v else 0.0) for t, v in autocorr_by_tier.items()},
            "submitted": submitted,
        }

    @torch.no_grad()
    def process_queue(self, layers: dict[str, "DynamicLoraLayer"], tick: int) -> int:
        """One tick of the bandwidth queue: run the admitted migrations; returns how many ran."""
        done = 0
        for request in self.queue.tick(tick):
            if self.run_migration(layers, request.module, request.source, request.target, request=request, tick=tick):
                done += 1
        return done

    def fast_track(self, layers: dict[str, "DynamicLoraLayer"], fast: str, slow: str) -> int:
        count = 0
        for name, layer in layers.items():
            size = layer.tier_ranks[self.adapter_name][fast] * (layer.in_features + layer.out_features)
            request = self.queue.submit(module=name, source=fast, target=slow, priority=1.0, criticality=1.0,
                                        size=size, tick=self.step_count, fast_track=True)
            if request is not None:
                count += 1
        self.counters["fast_tracks"] += count
        self.record("fast_track", tiers=[fast, slow], modules=count,
                    vertical_ema=self.tier_states[fast].vertical_ema)
        return count

    @torch.no_grad()
    def run_migration(
        self,
        layers: dict[str, "DynamicLoraLayer"],
        module: str,
        source: str,
        target: str,
        request=None,
        subspace: Optional[torch.Tensor] = None,
        tick: Optional[int] = None,
    ) -> Optional[dict]:
        """Move the top-k pattern of `source` on `module` into `target`; returns the audit entry."""
        config = self.config
        if module not in layers:
            raise KeyError(f"Module {module!r} is not adapted by {self.adapter_name!r}.")
        for tier in (source, target):
            if tier not in self.tiers:
                raise ValueError(f"Unknown tier {tier!r}; tiers of this adapter: {self.tiers}.")
        if self.tiers.index(target) != self.tiers.index(source) - 1:
            raise ValueError(f"Migration goes to the next slower tier: {source!r} -> "
                             f"{self.tiers[max(self.tiers.index(source) - 1, 0)]!r}, not {target!r}.")
        layer = layers[module]
        scalings = layer.tier_scalings[self.adapter_name]
        src_a, src_b = self._factor(layer, source, "A"), self._factor(layer, source, "B")
        dst_a, dst_b = self._factor(layer, target, "A"), self._factor(layer, target, "B")
        if subspace is None:
            k = min(config.subspace_rank, src_a.shape[0])
            subspace, norm = top_subspace(src_b, src_a, scalings[source], k)
            if norm <= 1e-12:
                self.record("migration_skipped", module=module, tiers=[source, target], reason="empty source")
                return None
        # what the adapter does to this module before the move: the reference of the health criterion
        adapter_norm = self._module_delta_norm(layer)
        result = migrate_pattern(src_a, src_b, scalings[source], dst_a, dst_b, scalings[target],
                                 subspace, config.migration_rate)
        if not all(torch.isfinite(t).all() for t in (result.source_b, result.target_a, result.target_b)):
            self.record("migration_skipped", module=module, tiers=[source, target], reason="non-finite result")
            return None
        dst_state = self.module_states[module][target]
        point = self.ring.push(
            self.step_count,
            module,
            [source, target],
            {
                f"{source}.A": src_a, f"{source}.B": src_b,
                f"{target}.A": dst_a, f"{target}.B": dst_b,
                f"{target}.init_A": dst_state.tensors["init_A"],
            },
        )
        src_b.copy_(result.source_b)
        dst_a.copy_(result.target_a)
        dst_b.copy_(result.target_b)
        # decay of the target pulls toward B = 0 with the new A (dW = 0), not toward the old random A
        dst_state.tensors["init_A"] = result.target_a.detach().clone()
        for tier, (factor_a, factor_b) in ((source, (src_a, src_b)), (target, (dst_a, dst_b))):
            state = self.module_states[module][tier]
            self._state_tensor(state, "anchor_A", factor_a).copy_(factor_a)
            self._state_tensor(state, "anchor_B", factor_b).copy_(factor_b)
        self.counters["migrations"] += 1
        # Health judges the change of the module's whole delta W (what the model computes), not of the destination
        # tier: early in training every tier is full-rank noise, and squeezing rank r + k into rank r cuts ~30% of
        # the destination's small sum while the adapter's output moves by a fraction of a percent.
        adapter_relative = result.truncation_error / adapter_norm if adapter_norm > 0 else 0.0
        self.recent_truncation.append(adapter_relative)
        entry = self.record(
            "migration",
            module=module,
            tiers=[source, target],
            size=int(src_a.shape[0] * (layer.in_features + layer.out_features)),
            moved_norm=result.moved_norm,
            truncation_error=result.truncation_error,
            relative_truncation_error=result.relative_truncation_error,
            adapter_relative_truncation_error=adapter_relative,
            wait=((self.step_count if tick is None else tick) - request.enqueued_tick) if request is not None else 0,
            fast_track=bool(request.fast_track) if request is not None else False,
            rollback_point=point.point_id,
            provenance=self._provenance(),
        )
        return entry

    def rollback(self, layers: dict[str, "DynamicLoraLayer"], count: int) -> list[dict]:
        """Undo the last `count` migrations, newest first, restoring the exact overwritten tensors."""
        points = self.ring.pop_latest(count)
        undone = []
        with torch.no_grad():
            for point in points:
                layer = layers[point.module]
                for key, tensor in point.tensors.items():
                    tier, what = key.split(".", 1)
                    state = self.module_states[point.module][tier]
                    if what in FACTOR_FIELDS:
                        param = self._factor(layer, tier, what)
                        param.copy_(tensor.to(param.device))
                        self._state_tensor(state, f"anchor_{what}", param).copy_(param)
                    else:
                        state.tensors[what] = tensor.clone()
                self.counters["rollbacks"] += 1
                undone.append(self.record("rollback", module=point.module, tiers=point.tiers,
                                          rollback_point=point.point_id, provenance=self._provenance()))
        return undone

    # ----- horizontal resonance ------------------------------------------------------------------------
    @torch.no_grad()
    def synchronise_ranks(self, layers: dict[str, "DynamicLoraLayer"]) -> dict[str, Any]:
        config = self.config
        report: dict[str, Any] = {}
        names = sorted(layers)  # same order on every rank
        for tier in self.tiers:
            scope = config.scope_of(tier)
            if scope not in ("shared", "swarm"):
                continue
            params = [self._factor(layers[n], tier, w) for n in names for w in FACTOR_FIELDS]
            anchors = [self.module_states[n][tier].tensors[f"anchor_{w}"] for n in names for w in FACTOR_FIELDS]
            new_flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            old_flat = torch.cat([a.to(new_flat.device).reshape(-1).float() for a in anchors])
            if scope == "swarm":
                synced, alignment, weight = resonance_all_reduce(
                    old_flat, new_flat, config.horizontal_amplification, config.horizontal_dampening
                )
                self.tier_states[tier].horizontal_alignment = alignment
                self.tier_states[tier].horizontal_weight = weight
                report[tier] = {"alignment": alignment, "weight": weight}
            else:
                synced = average_all_reduce(new_flat)
                report[tier] = {"averaged": True}
            offset = 0
            for param in params:
                count = param.numel()
                param.copy_(synced[offset: offset + count].view_as(param).to(param.dtype))
                offset += count
        return report

    # ----- health --------------------------------------------------------------------------------------
    def _health_metrics(self, nonfinite: bool) -> dict[str, Any]:
        config = self.config
        depth = self.queue.depth
        average_wait = self.queue.average_wait(self.step_count)
        conflict_rate = sum(self.conflict_history) / len(self.conflict_history) if self.conflict_history else 0.0
        truncation = max(self.recent_truncation) if self.recent_truncation else 0.0
        low, high = config.health_screened_range
        levels: dict[str, int] = {
            "queue_depth": _level(depth, config.health_max_queue_depth, (2.0, 4.0)),
            "average_wait": _level(average_wait, config.health_max_avg_wait, (2.0, 5.0)),
            "conflict_rate": min(_level(conflict_rate, config.health_max_conflict_rate, (3.0, 1e9)), 2)
            if config.health_max_conflict_rate > 0 else int(conflict_rate > 0) * 2,
            "truncation_error": min(_level(truncation, config.health_max_truncation_error, (3.0, 1e9)), 2)
            if config.health_max_truncation_error > 0 else int(truncation > 0) * 2,
        }
        screened_level = 0
        for tier in self.tiers:
            tier_state = self.tier_states[tier]
            if not tier_state.grad_norm_seen:
                continue  # no importance signal yet
            fraction = tier_state.screened_fraction
            if low <= fraction <= high:
                continue
            screened_level = max(screened_level, 1 if (low - 0.15) <= fraction <= (high + 0.15) else 2)
        levels["screened_fraction"] = screened_level
        if nonfinite:
            levels["nonfinite"] = 3
        worst = max(levels.values())
        state = HEALTH_STATES[worst]
        self.health_counts[state] += 1
        total = sum(self.health_counts.values())
        return {
            "health": state,
            "health_reasons": sorted(k for k, v in levels.items() if v == worst and worst > 0),
            "queue_depth": depth,
            "average_wait": average_wait,
            "conflict_rate": conflict_rate,
            "truncation_error": truncation,
            "healthy_fraction": self.health_counts["HEALTHY"] / total if total else 1.0,
            "tiers": {t: self.tier_states[t].to_dict() for t in self.tiers},
        }

    def health(self) -> dict[str, Any]:
        """Latest health report; before the first step the adapter is HEALTHY by construction."""
        if not self.last_metrics:
            return {"health": "HEALTHY", "health_reasons": [], "queue_depth": 0, "average_wait": 0.0,
                    "conflict_rate": 0.0, "truncation_error": 0.0, "healthy_fraction": 1.0, "step": 0,
                    "tiers": {t: self.tier_states[t].to_dict() for t in self.tiers}, "counters": dict(self.counters)}
        report = {k: v for k, v in self.last_metrics.items() if k not in ("patterns", "horizontal")}
        report["counters"] = dict(self.counters)
        return report

    # ----- persistence ---------------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        return {
            "tiers": [{"name": t, "rank": self.config.rank_of(t)} for t in self.tiers],
            "modules": {name: list(shape) for name, shape in sorted(self.module_shapes.items())},
        }

    def state_dict(self, weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able dict) holding everything needed to resume the dynamics bit for bit (format v2).

        `weights` are the adapter factors saved next to the state, keyed by `factor_key(module, tier, "A"|"B")`.
        What they determine is not stored (see STATE_ENCODING): anchors and init_A equal to the factors (always
        the anchors after a step), an all-zero init_B or importance, and screened masks are packed 8 per byte.
        """
        tensors: dict[str, torch.Tensor] = {}
        module_scalars: dict[str, dict[str, Any]] = {}
        for name, per_tier in self.module_states.items():
            module_scalars[name] = {}
            for tier, state in per_tier.items():
                for key, tensor in state.tensors.items():
                    factor = weights[factor_key(name, tier, _factor_of(key))]
                    stored_key, value = _encode_module_tensor(key, tensor, factor)
                    if value is not None:
                        tensors[f"module.{name}.{tier}.{stored_key}"] = value
                if state.subspace is not None:
                    tensors[f"module.{name}.{tier}.subspace"] = state.subspace.detach().cpu()
                module_scalars[name][tier] = {
                    "stable_count": state.stable_count,
                    "last_autocorr": state.last_autocorr,
                    "has_subspace": state.subspace is not None,
                }
        for name, bases in self.protected.items():
            for side, basis in bases.items():
                tensors[f"protected.{name}.{side}"] = basis.detach().cpu()
        ring = []
        for point in self.ring.points:
            ring.append(point.describe())
            for key, tensor in point.tensors.items():
                tensors[f"ring.{point.point_id}.{key}"] = tensor.detach().cpu()
        payload = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "encoding": STATE_ENCODING,
            "stored_tensors": len(tensors),
            "adapter_name": self.adapter_name,
            "layout": self.layout(),
            "step": self.step_count,
            "tier_states": {t: s.to_dict() for t, s in self.tier_states.items()},
            "module_scalars": module_scalars,
            "queue": self.queue.state_dict(),
            "ring": {"capacity": self.ring.capacity, "next_point_id": self.ring.next_point_id, "points": ring},
            "audit": list(self.audit),
            "health_counts": dict(self.health_counts),
            "recent_truncation": list(self.recent_truncation),
            "conflict_history": list(self.conflict_history),
            "counters": dict(self.counters),
            "last_nonfinite_step": self.last_nonfinite_step,
            "last_metrics": self.last_metrics,
        }
        return tensors, payload

    def check_compatible(self, payload: dict[str, Any], tensors: dict[str, torch.Tensor],
                         weights: dict[str, torch.Tensor]) -> None:
        """Raise ValueError, before anything is changed, if a saved state does not fit this adapter."""
        if payload.get("format") != STATE_FORMAT:
            raise ValueError(f"Not a DynamicLoRA dynamics state (format {payload.get('format')!r}).")
        version = payload.get("version")
        if version not in READABLE_STATE_VERSIONS:
            raise ValueError(
                f"The DynamicLoRA dynamics state has format version {version!r}; this reso_hf reads versions "
                f"{list(READABLE_STATE_VERSIONS)} (a newer reso_hf wrote it? upgrade reso_hf)."
            )
        saved_tiers = payload["layout"]["tiers"]
        expected_tiers = self.layout()["tiers"]
        if saved_tiers != expected_tiers:
            raise ValueError(
                "The saved dynamics state has a different tier layout: saved "
                f"{[(t['name'], t['rank']) for t in saved_tiers]}, this adapter has "
                f"{[(t['name'], t['rank']) for t in expected_tiers]} (tiers and tier_ranks must match)."
            )
        saved_modules = payload["layout"]["modules"]
        expected_modules = self.layout()["modules"]
        if saved_modules != expected_modules:
            missing = sorted(set(expected_modules) - set(saved_modules))
            extra = sorted(set(saved_modules) - set(expected_modules))
            raise ValueError(
                "The saved dynamics state adapts different modules: missing "
                f"{missing[:5]}, unexpected {extra[:5]} (or different shapes)."
            )
        if version >= 2 and payload["stored_tensors"] != len(tensors):
            raise ValueError(f"The saved dynamics state lists {payload['stored_tensors']} tensors but its file holds "
                             f"{len(tensors)}: the .safetensors and .json files do not belong together.")
        for name, per_tier in self.module_states.items():
            for tier, state in per_tier.items():
                for key in state.tensors:
                    weight = weights[factor_key(name, tier, _factor_of(key))]
                    if version == 1:
                        saved = tensors.get(f"module.{name}.{tier}.{key}")
                        expected = tuple(weight.shape)
                    else:
                        stored_key = _stored_key(key)
                        saved = tensors.get(f"module.{name}.{tier}.{stored_key}")
                        if saved is None:
                            continue  # derived from the weights (or zeros) on load
                        expected = (_packed_length(weight),) if stored_key != key else tuple(weight.shape)
                    if saved is None or tuple(saved.shape) != expected:
                        raise ValueError(f"The saved dynamics state lacks or misshapes 'module.{name}.{tier}.{key}'.")

    def load_state_dict(self, tensors: dict[str, torch.Tensor], payload: dict[str, Any],
                        weights: dict[str, torch.Tensor]) -> None:
        """Restore a state of format v1 or v2; `weights` are the factors saved with it (see `state_dict`)."""
        self.check_compatible(payload, tensors, weights)
        version = payload["version"]
        module_states: dict[str, dict[str, ModuleTierState]] = {}
        for name, per_tier in self.module_states.items():
            module_states[name] = {}
            for tier, state in per_tier.items():
                scalars = payload["module_scalars"][name][tier]
                device = state.tensors["anchor_A"].device
                restored = {}
                for key in state.tensors:
                    if version == 1:  # every tensor stored as it was in memory
                        value = tensors[f"module.{name}.{tier}.{key}"]
                    else:
                        value = _decode_module_tensor(key, tensors.get(f"module.{name}.{tier}.{_stored_key(key)}"),
                                                      weights[factor_key(name, tier, _factor_of(key))])
                    restored[key] = value.to(device).clone()
                module_states[name][tier] = ModuleTierState(
                    tensors=restored,
                    subspace=tensors[f"module.{name}.{tier}.subspace"].clone() if scalars["has_subspace"] else None,
                    stable_count=int(scalars["stable_count"]),
                    last_autocorr=float(scalars["last_autocorr"]),
                )
        self.module_states = module_states
        self.step_count = int(payload["step"])
        for tier, values in payload["tier_states"].items():
            self.tier_states[tier] = TierState(**values)
        self.queue.load_state_dict(payload["queue"])
        ring = RollbackRing(payload["ring"]["capacity"])
        ring.next_point_id = int(payload["ring"]["next_point_id"])
        for described in payload["ring"]["points"]:
            point = ring.push(described["step"], described["module"], described["tiers"],
                              {k: tensors[f"ring.{described['point_id']}.{k}"] for k in described["keys"]})
            point.point_id = described["point_id"]
        ring.next_point_id = int(payload["ring"]["next_point_id"])
        self.ring = ring
        self.audit = deque(payload["audit"], maxlen=self.config.audit_log_capacity)
        self.health_counts = {s: int(payload["health_counts"][s]) for s in HEALTH_STATES}
        self.recent_truncation = deque((float(v) for v in payload["recent_truncation"]), maxlen=20)
        self.conflict_history = deque((int(v) for v in payload["conflict_history"]), maxlen=100)
        # states written before a counter existed lack it
        self.counters = {**EMPTY_COUNTERS, **{k: int(v) for k, v in payload["counters"].items()}}
        protected: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            if key.startswith("protected."):
                module, side = key[len("protected."):].rsplit(".", 1)
                protected.setdefault(module, {})[side] = tensor.clone()
        self.protected = protected
        self.last_nonfinite_step = int(payload["last_nonfinite_step"])
        self.last_metrics = payload["last_metrics"]


# ----- the saved form of the per-(module, tier) tensors ----------------------------------------------------------
# Version 1 stored every tensor of MODULE_TENSOR_FIELDS as it is in memory: 3.25x the adapter weights (anchors
# and init_A repeat the factors, init_B is zero, masks took a byte per element). Version 2 leaves out what the
# saved factors determine; it is what state_dict writes, and load_state_dict reads both.
STATE_FORMAT = "reso_hf.dynamic_lora.state"
STATE_VERSION = 2
READABLE_STATE_VERSIONS = (1, 2)
STATE_ENCODING = (
    "per module and tier: anchor_A/anchor_B and init_A, when absent, equal the saved factor A/B; init_B and "
    "importance_A/importance_B, when absent, are zeros; screened_A/screened_B are stored as screened_A_bits/"
    "screened_B_bits (uint8, 8 elements per byte, most significant bit first, row-major), absent when none is set"
)
_DERIVED_FROM_FACTOR = ("anchor_A", "anchor_B", "init_A")
_ZERO_WHEN_ABSENT = ("init_B", "importance_A", "importance_B")
_PACKED = ("screened_A", "screened_B")
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def factor_key(module: str, tier: str, which: str) -> str:
    """Key of one factor in `DynamicLoraModel.tier_tensors` and in the `weights` of state_dict/load_state_dict."""
    return f"{module}.{tier}.{which}"


def _factor_of(key: str) -> str:
    """"A" or "B": the factor a per-module tensor (e.g. "importance_B") has the shape of."""
    return key.rsplit("_", 1)[1]


def _stored_key(key: str) -> str:
    return key + "_bits" if key in _PACKED else key


def _packed_length(like: torch.Tensor) -> int:
    return (like.numel() + 7) // 8


def _as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as integers, so that comparisons see bits (unlike ==: -0.0 vs 0.0, NaN payloads)."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _same_bits(tensor: torch.Tensor, other: torch.Tensor) -> bool:
    if tensor.dtype != other.dtype or tensor.shape != other.shape:
        return False
    return torch.equal(_as_bits(tensor), _as_bits(other.to(tensor.device)))


def _all_zero_bits(tensor: torch.Tensor) -> bool:
    return int(torch.count_nonzero(_as_bits(tensor))) == 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8, 8 elements per byte (most significant bit first, row-major)."""
    flat = mask.detach().reshape(-1).cpu().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The boolean tensor of `like`'s shape that `pack_bits` packed."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1).to(torch.uint8) >> shifts) & 1
    return bits.reshape(-1)[: like.numel()].view(like.shape).bool()


def _encode_module_tensor(key: str, tensor: torch.Tensor,
                          factor: torch.Tensor) -> tuple[str, Optional[torch.Tensor]]:
    """(stored key, value to store or None when the factor determines it)."""
    if key in _PACKED:
        return _stored_key(key), None if _all_zero_bits(tensor) else pack_bits(tensor)
    if key in _DERIVED_FROM_FACTOR and _same_bits(tensor, factor.detach()):
        return key, None
    if key in _ZERO_WHEN_ABSENT and _all_zero_bits(tensor):
        return key, None
    return key, tensor.detach().cpu()


def _decode_module_tensor(key: str, stored: Optional[torch.Tensor], factor: torch.Tensor) -> torch.Tensor:
    if key in _PACKED:
        return unpack_bits(stored, factor) if stored is not None else torch.zeros_like(factor, dtype=torch.bool)
    if stored is not None:
        return stored
    if key in _DERIVED_FROM_FACTOR:
        return factor.detach()
    return torch.zeros_like(factor)
