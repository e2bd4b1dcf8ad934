"""Configuration of the DynamicLoRA tuner (SPEC §5.1-§5.8; consolidation, protected subspaces, importance damping
and budget-scaled windows: docs/dynamic_lora.md).

One adapter holds an ordered hierarchy of tiers, slowest first. Every tier is a LoRA factor pair on each
targeted module; the tier list, the ranks, the base inertia and the privacy of each tier come from here,
together with every knob of the dynamics (inertia, phases, pattern detection, migration, resonance, health).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ._peft_type import ensure_dynamic_lora_peft_type
from .serialization import atomic_write_text

ensure_dynamic_lora_peft_type()

# The tier vocabulary, slowest first. Migration always goes from a tier to the next slower tier that the
# adapter actually uses, so the order is part of the meaning and is enforced on the configured list.
KNOWN_TIERS: tuple[str, ...] = ("foundation", "domain", "swarm", "agent", "context")

# Total rank 62: 2.65% of SmolLM2-135M's parameters on PEFT's default q/v targets, 5.3% on all four attention
# projections (benchmarks/dynamic_lora_state_size.py). Until issue 20 the defaults were twice these (124: 5.3% and
# 10.6%, above the < 5% target); adapters saved with tier_ranks={} then hold those ranks (see PRE_ISSUE_20_RANKS).
DEFAULT_TIER_RANKS: dict[str, int] = {"foundation": 32, "domain": 16, "swarm": 8, "agent": 4, "context": 2}
PRE_ISSUE_20_RANKS: dict[str, int] = {"foundation": 64, "domain": 32, "swarm": 16, "agent": 8, "context": 4}
DEFAULT_TIER_INERTIA: dict[str, float] = {
    "foundation": 0.99,
    "domain": 0.9,
    "swarm": 0.7,
    "agent": 0.5,
    "context": 0.1,
}
# "shared": one copy for everybody (kept identical across ranks by plain averaging when horizontal resonance
# is on); "swarm": shared across agents through the resonance-weighted all-reduce; "agent" and "session":
# local to one rank / one session, never synchronised.
TIER_SCOPES: dict[str, str] = {
    "foundation": "shared",
    "domain": "shared",
    "swarm": "swarm",
    "agent": "agent",
    "context": "session",
}
ALLOWED_PRIVACY: tuple[str, ...] = ("public", "team_shared", "private")
DENSITY_GRADIENTS: tuple[str, ...] = ("delta_w", "factors")
PROTECTED_SUBSPACES: tuple[str, ...] = ("none", "column", "row", "both")

# Bandwidth is keyed by the SOURCE tier of a migration channel (source -> next slower tier).
DEFAULT_MIGRATION_BANDWIDTH: dict[str, float] = {
    "context": 0.01,
    "agent": 0.005,
    "swarm": 0.001,
    "domain": 0.0001,
}

# Written next to adapter_config.json: the dynamics state of the adapter.
DYNAMICS_STATE_TENSORS_NAME = "dynamic_lora_state.safetensors"
DYNAMICS_STATE_JSON_NAME = "dynamic_lora_state.json"
AUDIT_LOG_NAME = "dynamic_lora_audit.jsonl"
# safetensors metadata key of the state file: the JSON list of the tiers whose dynamics it holds (format 2 stores
# no tensor of a tier whose state the weights determine, so the keys alone do not tell)
DYNAMICS_STATE_TIERS_METADATA = "dynamic_lora_tiers"


def _field(default: Any, help_text: str):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class DynamicLoraConfig(PeftConfig):
    """Configuration of a [`DynamicLoraModel`].

    The adapter computes `y = W0 x + sum_t s_t B_t A_t x` over the tiers `t` (one fused low-rank product) and
    runs the dynamics of SPEC §5 after each optimizer step (`DynamicLoraModel.dynamic_step`, called by
    `DynamicLoraCallback` under `Trainer`).
    """

    # ----- what is adapted ---------------------------------------------------------------------------------
    target_modules: Optional[Union[list[str], str]] = _field(
        None,
        "Module names (suffix match) or a regex (full match) to adapt, e.g. ['q_proj', 'v_proj'] or 'all-linear'. "
        "nn.Linear and transformers' Conv1D (GPT-2) are supported. None uses PEFT's LoRA defaults for known "
        "architectures.",
    )
    exclude_modules: Optional[Union[list[str], str]] = _field(
        None, "Module names or a regex that must not be adapted even if target_modules matches them."
    )
    target_parameters: Optional[list[str]] = _field(
        None, "Not supported by DynamicLoRA (kept for PEFT's matching code); must stay None."
    )
    layers_to_transform: Optional[Union[list[int], int]] = _field(
        None, "Only adapt the layers with these indices (as in LoraConfig)."
    )
    layers_pattern: Optional[Union[list[str], str]] = _field(
        None, "Name of the layer list used with layers_to_transform, e.g. 'layers' or 'h'."
    )
    modules_to_save: Optional[list[str]] = _field(
        None, "Extra modules that are trained fully and saved with the adapter (as in LoraConfig)."
    )
    dropout: float = _field(0.0, "Dropout on the adapter input, in [0, 1).")
    fan_in_fan_out: bool = _field(
        False,
        "True when the adapted weights are stored (in, out) like GPT-2's Conv1D. Set automatically for Conv1D.",
    )
    bias: str = _field("none", "Bias training: only 'none' is supported.")
    init_weights: bool = _field(
        True,
        "True: B = 0 so the adapter starts as the identity change (A is Kaiming-uniform). False: B is random "
        "too (for tests of merging and export).",
    )

    # ----- tiers (§5.1) ------------------------------------------------------------------------------------
    tiers: list[str] = _field(
        list(KNOWN_TIERS),
        f"Tiers held by the adapter, slowest first; a subsequence of {list(KNOWN_TIERS)}.",
    )
    tier_ranks: dict[str, int] = _field(
        {}, f"Rank per tier (overrides of the defaults {DEFAULT_TIER_RANKS}); every value must be > 0."
    )
    tier_inertia: dict[str, float] = _field(
        {}, f"Base inertia alpha_base per tier, in [0, 1) (overrides of {DEFAULT_TIER_INERTIA})."
    )
    alpha: Optional[float] = _field(
        None,
        "Scaling numerator shared by the tiers, as LoRA's lora_alpha: s_t = alpha / rank_t. None (default): "
        "s_t = sqrt(R / (T rank_t)) with R the total rank and T the number of tiers, so that sum_t s_t^2 rank_t = R: "
        "an Adam step changes the weights as much as a LoRA of rank R with lora_alpha = R does (it trains at the same "
        "learning rates), and every tier gets an equal share of that step (README, DynamicLoRA). > 0.",
    )
    tier_alpha: dict[str, float] = _field(
        {}, "Scaling numerator per tier, overriding alpha and the default: s_t = tier_alpha[t] / rank_t "
        "(tier_alpha = rank gives s_t = 1)."
    )
    tier_privacy: dict[str, str] = _field(
        {},
        f"Privacy per tier, one of {list(ALLOWED_PRIVACY)} (default 'public'). 'private' tiers are left out of "
        "save_pretrained / export_lora unless include_private=True.",
    )

    # ----- inertia and interaction density (§5.2) ----------------------------------------------------------
    dynamics_enabled: bool = _field(
        True, "Run the dynamics in dynamic_step(). False turns the adapter into a static multi-tier LoRA."
    )
    density_coupling: float = _field(
        1.0, "kappa in alpha_eff = alpha_base + (1 - alpha_base) tanh(kappa max(0, rho - 1)); >= 0."
    )
    density_ema_beta: float = _field(0.9, "EMA factor for the per-tier gradient norm behind rho, in [0, 1).")
    density_gradient: str = _field(
        "delta_w",
        "Gradient behind rho_t = n_agents(t) EMA(||grad||) / mean: 'delta_w', the gradient of the tier's delta W "
        "(SPEC §5.2; the same for every tier of a module, since y = W0 x + sum_t dW_t x, so only the number of "
        "agents sharing a tier sets its density) or 'factors', the norm of the A and B gradients (first release: it "
        "grows with the tier's rank and scaling, and made the rank-1 context tier the slowest but one).",
    )

    # ----- phases (§5.3) -----------------------------------------------------------------------------------
    importance_beta: float = _field(0.85, "EMA factor beta of the importance I <- beta I + (1-beta)|theta*grad|.")
    screening_threshold: float = _field(
        1.0, "Initial tau: an element whose normalised importance exceeds tau becomes SCREENED."
    )
    hysteresis_ratio: float = _field(
        0.8, "A SCREENED element becomes FREE again only below hysteresis_ratio * tau; in (0, 1]."
    )
    screened_decay: float = _field(1e-4, "Per-step decay toward init of SCREENED elements, in [0, 1].")
    free_decay: float = _field(1e-2, "Per-step decay toward init of FREE elements, in [0, 1].")
    decay_follows_inertia: bool = _field(
        False,
        "True scales a tier's per-step decay by (1 - alpha_eff) like its gradient updates, so that a slow tier keeps "
        "what it holds on its own time scale (with the same 1e-2 FREE decay everywhere, the foundation tier's FREE "
        "elements have a half-life of about 70 steps). False (default) is SPEC §5.3: one decay for every tier. "
        "The continual benchmark measured no difference at its 80-step budget.",
    )
    homeostasis_upper: float = _field(0.7, "tau *= homeostasis_up_factor when the screened fraction exceeds this.")
    homeostasis_lower: float = _field(0.4, "tau *= homeostasis_down_factor when the screened fraction is below.")
    homeostasis_up_factor: float = _field(1.1, "Multiplier of tau when too many elements are screened; > 1.")
    homeostasis_down_factor: float = _field(0.9, "Multiplier of tau when too few elements are screened; in (0, 1).")

    # ----- pattern detection (§5.4) ------------------------------------------------------------------------
    autocorr_window: int = _field(100, "Steps between two subspace measurements; > 0.")
    subspace_rank: int = _field(4, "k: dimension of the top-k left singular subspace (capped by the tier rank).")
    stable_windows: int = _field(3, "Consecutive windows above stability_threshold that make a pattern stable.")
    stability_threshold: float = _field(0.7, "autocorr = ||U_t^T U_{t-1}||_F^2 / k above this counts; in (0, 1].")

    # ----- migration (§5.5) --------------------------------------------------------------------------------
    migration_enabled: bool = _field(True, "Move stable subspaces from a fast tier to the next slower one.")
    migration_rate: float = _field(0.5, "eta: fraction of the projected pattern that moves; in (0, 1].")
    migration_bandwidth: dict[str, float] = _field(
        DEFAULT_MIGRATION_BANDWIDTH,
        "Per channel (keyed by source tier) fraction of the source tier's parameters that may move per tick.",
    )
    bandwidth_refill: float = _field(
        0.9, "Credit retention per tick: credit <- refill * credit + budget (bounds bursts); in [0, 1)."
    )
    queue_aging: float = _field(
        0.05, "Priority gained per tick of waiting, so that no request starves behind newer ones; >= 0."
    )
    max_queue_size: int = _field(1024, "Requests beyond this queue depth are rejected (and audited); > 0.")
    emergency_criticality: float = _field(
        0.9, "Requests with criticality >= this bypass the bandwidth limit (emergency bypass); in (0, 1]."
    )
    rollback_capacity: int = _field(16, "Number of migration rollback points kept in the ring; > 0.")

    # ----- resonance (§5.7) --------------------------------------------------------------------------------
    vertical_resonance: bool = _field(True, "Cosine between a fast tier's update and the slower tier's delta W.")
    vertical_threshold: float = _field(0.5, "Above this cosine the fast tier's pattern is fast-tracked.")
    conflict_threshold: float = _field(0.3, "Below -conflict_threshold the fast tier's update is damped.")
    conflict_damping: float = _field(0.5, "delta: the update is scaled by (1 - delta |v|); in [0, 1].")
    horizontal_resonance: bool = _field(
        False,
        "Under torch.distributed, synchronise the swarm tier with a resonance-weighted all-reduce (and average "
        "shared tiers). Off by default (safe mode).",
    )
    horizontal_amplification: float = _field(0.5, "alpha: weight 1 + alpha a for a rank aligned with consensus.")
    horizontal_dampening: float = _field(0.3, "beta: weight 1 - beta |a| for a rank opposed to consensus.")

    # ----- consolidation and protected subspaces (README "Consolidation") ------------------------------------
    consolidation_memory_tiers: int = _field(
        2,
        "N: the N slowest tiers are the memory that consolidate() folds the adapter into (truncated SVD of the summed "
        "delta W, the strongest directions to the slowest tier); the other, faster tiers are re-initialised (B = 0, "
        "fresh A). >= 1, and consolidate() needs at least one fast tier (N < number of tiers).",
    )
    protected_subspace: str = _field(
        "none",
        f"What the fast tiers' updates are kept away from after a consolidation: 'column' (their delta W's column "
        f"space: B updates projected off the memory's left singular space), 'row' (A updates projected off its right "
        f"singular space), 'both', or 'none'. One of {list(PROTECTED_SUBSPACES)}.",
    )
    protection_strength: float = _field(
        1.0,
        "gamma: the fast-tier update u loses gamma times its component in the protected space, u <- u - gamma Q Q^T u; "
        "1 makes it orthogonal (O-LoRA / InfLoRA), below 1 only damps it; in [0, 1].",
    )
    importance_damping: float = _field(
        0.0,
        "lambda: every element's realised update is scaled by 1 / (1 + lambda I_hat), I_hat its §5.3 importance "
        "normalised to mean 1 over the tier (EWC-like: important elements move less). 0 turns it off; >= 0.",
    )
    dynamics_horizon: Optional[int] = _field(
        None,
        "Steps the dynamics should act within (one task or session). When set, the effective window is "
        "max(2, round(autocorr_window_fraction x horizon)) instead of autocorr_window, the migration bandwidths are "
        "multiplied by autocorr_window / that window (same budget per measured window) and the vertical-resonance "
        "EMA averages over one window. None: the fixed SPEC §5.4 windows. > 0.",
    )
    autocorr_window_fraction: float = _field(
        0.2, "With dynamics_horizon: the pattern-detection window as a fraction of the horizon; in (0, 1]."
    )

    # ----- health (§5.6) -----------------------------------------------------------------------------------
    health_max_queue_depth: int = _field(50, "HEALTHY needs queue depth below this (seed: < 50).")
    health_max_avg_wait: float = _field(10.0, "HEALTHY needs the average migration wait below this many ticks.")
    health_screened_range: list[float] = _field(
        [0.4, 0.7], "HEALTHY needs every tier's screened fraction inside [low, high]."
    )
    health_max_conflict_rate: float = _field(0.1, "HEALTHY needs the fraction of conflicting tier pairs below.")
    health_max_truncation_error: float = _field(
        0.05,
        "HEALTHY needs the truncation error of each of the last 20 migrations, relative to the module's whole delta W "
        "before it (how much the migration changed what the adapter computes), below this.",
    )
    audit_log_capacity: int = _field(10000, "Audit entries kept in memory (oldest dropped first); > 0.")

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.DYNAMIC_LORA
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        self._validate()

    # ----- validation --------------------------------------------------------------------------------------
    def _validate(self) -> None:
        tiers = list(self.tiers)
        if not tiers:
            raise ValueError(f"DynamicLoraConfig.tiers must name at least one tier out of {list(KNOWN_TIERS)}.")
        unknown = [t for t in tiers if t not in KNOWN_TIERS]
        if unknown:
            raise ValueError(
                f"DynamicLoraConfig.tiers has unknown tier names {unknown}; allowed: {list(KNOWN_TIERS)}."
            )
        if len(set(tiers)) != len(tiers):
            raise ValueError(f"DynamicLoraConfig.tiers lists a tier twice: {tiers}.")
        canonical = [t for t in KNOWN_TIERS if t in tiers]
        if tiers != canonical:
            raise ValueError(
                f"DynamicLoraConfig.tiers must be ordered slowest first as in {list(KNOWN_TIERS)}; "
                f"got {tiers}, expected {canonical}."
            )
        for name in ("tier_ranks", "tier_inertia", "tier_alpha", "tier_privacy", "migration_bandwidth"):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict):
                raise ValueError(f"DynamicLoraConfig.{name} must be a dict keyed by tier name, got {mapping!r}.")
            allowed = list(KNOWN_TIERS)
            bad = [k for k in mapping if k not in allowed]
            if bad:
                raise ValueError(f"DynamicLoraConfig.{name} has unknown tier names {bad}; allowed: {allowed}.")
        for tier, rank in self.tier_ranks.items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ValueError(
                    f"DynamicLoraConfig.tier_ranks[{tier!r}] must be a positive integer (allowed: 1, 2, ...), "
                    f"got {rank!r}."
                )
        for tier, inertia in self.tier_inertia.items():
            if not isinstance(inertia, (int, float)) or not (0.0 <= float(inertia) < 1.0):
                raise ValueError(
                    f"DynamicLoraConfig.tier_inertia[{tier!r}] must be in [0, 1) (allowed: 0 <= alpha < 1), "
                    f"got {inertia!r}."
                )
        for tier, alpha in self.tier_alpha.items():
            if not isinstance(alpha, (int, float)) or float(alpha) <= 0:
                raise ValueError(f"DynamicLoraConfig.tier_alpha[{tier!r}] must be > 0, got {alpha!r}.")
        for tier, privacy in self.tier_privacy.items():
            if privacy not in ALLOWED_PRIVACY:
                raise ValueError(
                    f"DynamicLoraConfig.tier_privacy[{tier!r}] must be one of {list(ALLOWED_PRIVACY)}, "
                    f"got {privacy!r}."
                )
        for tier, bandwidth in self.migration_bandwidth.items():
            if not isinstance(bandwidth, (int, float)) or float(bandwidth) <= 0:
                raise ValueError(f"DynamicLoraConfig.migration_bandwidth[{tier!r}] must be > 0, got {bandwidth!r}.")
        if self.target_parameters:
            raise ValueError("DynamicLoraConfig.target_parameters is not supported; allowed: None.")
        if self.bias != "none":
            raise ValueError(f"DynamicLoraConfig.bias must be 'none' (allowed: ['none']), got {self.bias!r}.")

        def check_range(name: str, low: float, high: float, low_open: bool = False, high_open: bool = False):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"DynamicLoraConfig.{name} must be a number, got {value!r}.")
            too_low = value <= low if low_open else value < low
            too_high = value >= high if high_open else value > high
            if too_low or too_high:
                left = "(" if low_open else "["
                right = ")" if high_open else "]"
                raise ValueError(f"DynamicLoraConfig.{name} must be in {left}{low}, {high}{right}, got {value!r}.")

        inf = float("inf")
        check_range("dropout", 0.0, 1.0, high_open=True)
        check_range("density_coupling", 0.0, inf)
        check_range("density_ema_beta", 0.0, 1.0, high_open=True)
        if self.density_gradient not in DENSITY_GRADIENTS:
            raise ValueError(f"DynamicLoraConfig.density_gradient must be one of {list(DENSITY_GRADIENTS)}, "
                             f"got {self.density_gradient!r}.")
        check_range("importance_beta", 0.0, 1.0, high_open=True)
        check_range("screening_threshold", 0.0, inf, low_open=True)
        check_range("hysteresis_ratio", 0.0, 1.0, low_open=True)
        check_range("screened_decay", 0.0, 1.0)
        check_range("free_decay", 0.0, 1.0)
        if self.alpha is not None:
            check_range("alpha", 0.0, inf, low_open=True)
        check_range("homeostasis_lower", 0.0, 1.0)
        check_range("homeostasis_upper", 0.0, 1.0)
        if self.homeostasis_lower > self.homeostasis_upper:
            raise ValueError(
                "DynamicLoraConfig.homeostasis_lower must not exceed homeostasis_upper, got "
                f"{self.homeostasis_lower} > {self.homeostasis_upper}."
            )
        check_range("homeostasis_up_factor", 1.0, inf, low_open=True)
        check_range("homeostasis_down_factor", 0.0, 1.0, low_open=True, high_open=True)
        for name in ("autocorr_window", "subspace_rank", "stable_windows", "max_queue_size", "rollback_capacity",
                     "audit_log_capacity", "health_max_queue_depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DynamicLoraConfig.{name} must be a positive integer, got {value!r}.")
        check_range("stability_threshold", 0.0, 1.0, low_open=True)
        check_range("migration_rate", 0.0, 1.0, low_open=True)
        check_range("bandwidth_refill", 0.0, 1.0, high_open=True)
        check_range("queue_aging", 0.0, inf)
        check_range("emergency_criticality", 0.0, 1.0, low_open=True)
        check_range("vertical_threshold", -1.0, 1.0)
        check_range("conflict_threshold", 0.0, 1.0)
        check_range("conflict_damping", 0.0, 1.0)
        check_range("horizontal_amplification", 0.0, inf)
        check_range("horizontal_dampening", 0.0, 1.0)
        check_range("health_max_avg_wait", 0.0, inf, low_open=True)
        check_range("health_max_conflict_rate", 0.0, 1.0)
        check_range("health_max_truncation_error", 0.0, inf)
        memory = self.consolidation_memory_tiers
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < 1:
            raise ValueError(f"DynamicLoraConfig.consolidation_memory_tiers must be a positive integer, got {memory!r}.")
        if self.protected_subspace not in PROTECTED_SUBSPACES:
            raise ValueError(f"DynamicLoraConfig.protected_subspace must be one of {list(PROTECTED_SUBSPACES)}, "
                             f"got {self.protected_subspace!r}.")
        check_range("protection_strength", 0.0, 1.0)
        check_range("importance_damping", 0.0, inf)
        if self.dynamics_horizon is not None and (
            not isinstance(self.dynamics_horizon, int) or isinstance(self.dynamics_horizon, bool)
            or self.dynamics_horizon <= 0
        ):
            raise ValueError(f"DynamicLoraConfig.dynamics_horizon must be None or a positive integer, "
                             f"got {self.dynamics_horizon!r}.")
        check_range("autocorr_window_fraction", 0.0, 1.0, low_open=True)
        screened_range = list(self.health_screened_range)
        if len(screened_range) != 2 or not (0.0 <= screened_range[0] <= screened_range[1] <= 1.0):
            raise ValueError(
                "DynamicLoraConfig.health_screened_range must be [low, high] with 0 <= low <= high <= 1, "
                f"got {self.health_screened_range!r}."
            )

    # ----- resolved per-tier values ------------------------------------------------------------------------
    def rank_of(self, tier: str) -> int:
        return int(self.tier_ranks.get(tier, DEFAULT_TIER_RANKS[tier]))

    def inertia_of(self, tier: str) -> float:
        return float(self.tier_inertia.get(tier, DEFAULT_TIER_INERTIA[tier]))

    def scaling_of(self, tier: str) -> float:
        if tier in self.tier_alpha:
            return float(self.tier_alpha[tier]) / self.rank_of(tier)
        if self.alpha is not None:
            return float(self.alpha) / self.rank_of(tier)
        # Adam moves every factor element by about lr per step, so tier t changes the weights by a matrix of norm
        # ~ lr s_t sqrt(out rank_t / 3), and independent tiers add in quadrature: sum_t s_t^2 rank_t = R gives the
        # step of a rank-R LoRA with scaling 1, shared equally by the T tiers.
        return math.sqrt(self.total_rank / (len(self.tiers) * self.rank_of(tier)))

    @property
    def effective_autocorr_window(self) -> int:
        """Steps between two pattern measurements: autocorr_window, or a fraction of dynamics_horizon when set."""
        if self.dynamics_horizon is None:
            return int(self.autocorr_window)
        return max(2, round(self.autocorr_window_fraction * self.dynamics_horizon))

    def effective_bandwidth_of(self, source_tier: str) -> float:
        """bandwidth_of, scaled with dynamics_horizon so that a channel moves the same share per measured window."""
        return self.bandwidth_of(source_tier) * self.autocorr_window / self.effective_autocorr_window

    @property
    def memory_tiers(self) -> list[str]:
        """The consolidation_memory_tiers slowest tiers (what consolidate() folds into and protects)."""
        return list(self.tiers[: self.consolidation_memory_tiers])

    @property
    def fast_tiers(self) -> list[str]:
        """The tiers that consolidate() folds into the memory tiers and re-initialises."""
        return list(self.tiers[self.consolidation_memory_tiers:])

    def privacy_of(self, tier: str) -> str:
        return self.tier_privacy.get(tier, "public")

    def scope_of(self, tier: str) -> str:
        return TIER_SCOPES[tier]

    def bandwidth_of(self, source_tier: str) -> float:
        return float(self.migration_bandwidth.get(source_tier, DEFAULT_MIGRATION_BANDWIDTH.get(source_tier, 0.01)))

    @property
    def total_rank(self) -> int:
        return sum(self.rank_of(t) for t in self.tiers)

    def tier_layout(self) -> list[dict]:
        """The tier layout that a saved dynamics state must match: names and ranks, in order."""
        return [{"name": t, "rank": self.rank_of(t)} for t in self.tiers]

    # ----- persistence -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        result = super().to_dict()
        for key, value in result.items():
            if isinstance(value, set):
                result[key] = sorted(value)
        return result

    def expect_dynamics_save(self, tuner, adapter_name: str, saved_tiers: list[str]) -> None:
        """Make the next `save_pretrained` of this config write `tuner`'s dynamics state of `adapter_name`.

        PEFT's `PeftModel.save_pretrained` has no hook for tuner state besides the adapter weights: for each adapter
        it asks the tuner for the weights (`DynamicLoraModel._get_adapter_state_dict`, which calls this) and then
        saves that adapter's config into the adapter's folder, where the dynamics state is written. The state is
        owned by the tuner, keyed by adapter name; this one-shot note only says whose state the very next config
        save belongs to, so one config shared by several adapters or models, a deep copy or a deleted adapter
        never writes another adapter's state. The note holds a weak reference and is dropped by pickling and
        copying (see `__getstate__`).
        """
        self._pending_dynamics_save = (weakref.ref(tuner), adapter_name, list(saved_tiers))

    def _claim_dynamics_save(self) -> tuple[Any, Optional[str], Optional[list[str]]]:
        """(tuner, adapter name, saved tiers) announced for this save, or (None, None, None)."""
        note = self.__dict__.pop("_pending_dynamics_save", None)
        if note is None:
            return None, None, None
        tuner, adapter_name, saved_tiers = note[0](), note[1], note[2]
        # the adapter may have been deleted or given another config since the announcement
        if tuner is None or tuner.peft_config.get(adapter_name) is not self:
            return None, None, None
        return tuner, adapter_name, saved_tiers

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_pending_dynamics_save", None)  # a weak reference to a live tuner: meaningless in a copy
        return state

    # Callables `hook(config, save_directory, tuner_or_None, adapter_name_or_None)` run after the config and the
    # dynamics state are written (PEFT calls this last, on the main process only). Not a dataclass field.
    _post_save_hooks = []

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}.")
        tuner, adapter_name, saved_tiers = self._claim_dynamics_save()
        os.makedirs(save_directory, exist_ok=True)
        auto_mapping_dict = kwargs.pop("auto_mapping_dict", None)
        output = self.to_dict()
        if auto_mapping_dict is not None:
            output["auto_mapping"] = auto_mapping_dict
        atomic_write_text(os.path.join(save_directory, "adapter_config.json"), json.dumps(output, indent=2, sort_keys=True))
        if tuner is not None:
            tuner.save_dynamics_state(save_directory, adapter_name=adapter_name, saved_tiers=saved_tiers)
        for hook in DynamicLoraConfig._post_save_hooks:  # e.g. reso_hf.hub's adapter-card writer
            hook(self, save_directory, tuner, adapter_name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, DynamicLoraConfig):
            # Remembered so that the tuner can restore the dynamics state saved next to the weights when PEFT
            # loads them (see DynamicLoraModel._remap_adapter_state_dict_for_load).
            config._dynamics_source = (str(pretrained_model_name_or_path), subfolder)
        return config
