"""Auxiliary resonance losses added to the language-model loss in training (issue 17; README "Crystalline components").

With B x T real tokens (padding excluded by the attention mask), L decoder layers and H key/value heads:

- ResonanceLoss (phase locking across depth), from each layer's coupled Kuramoto phase theta'^(l) (SPEC §3.3):
      L_res = mean_{l < L-1, h, t} (1 - cos(theta'^(l+1)_{h,t} - theta'^(l)_{h,t}))        in [0, 2]
  0 when every layer puts a token at the same phase, 1 for unrelated phases.
- CoherenceLoss (synchrony along the sequence), from the Kuramoto order parameter r_t = |z_t| (SPEC §3.3):
      L_coh = mean_{l, h, t} (1 - r^(l)_{h,t})                                             in [0, 1]
  0 when all phases of the causal mean field agree.
- HolographicLoss (every part encodes the whole): the final hidden states Y (N x d, after the last norm) are
  reconstructed from a random subset S of k = round(f d) of their dimensions by the ridge-regression head fitted on
  the batch in closed form, W = (X^T X + lambda tr(X^T X)/k I)^(-1) X^T Y with X = Y[:, S]:
      L_hol = ||X W - Y||_F^2 / ||Y||_F^2                                                  in [0, 1]
  about 0 when the hidden states span at most k directions that S sees, near 1 - k/d for isotropic noise.
  The head is refitted on each batch (differentiably), so it holds no state to checkpoint and measures the
  redundancy of the representation rather than the capacity of a trained head. S is drawn from a generator seeded
  by (seed, global step), leaving the global RNG (dropout, data order) untouched.

The total training loss is `loss + sum_i weight_i L_i`; each L_i is logged as `aux/<name>_loss` (the mean since the
last log, on this process). Evaluation (`eval_loss`) stays the plain language-model loss. Every weight 0 (the
default) computes nothing: training is bit-identical to training without this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..modeling.crystalline import GOLDEN_RATIO
from ..modeling.resonance import ResoLLMKuramoto

AUXILIARY_LOSS_NAMES = ("resonance", "coherence", "holographic")


@dataclass
class AuxiliaryLossArguments:
    resonance_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of the ResonanceLoss (Kuramoto phase locking across layers; needs kuramoto=True)."})
    coherence_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of the CoherenceLoss, mean of 1 - r_t (Kuramoto order parameter; needs kuramoto=True)."})
    holographic_loss_weight: float = field(default=0.0, metadata={
        "help": "Weight of the HolographicLoss (reconstruction of the final hidden state from a random subset of "
                "its dimensions)."})
    holographic_subset_fraction: float = field(default=1 / GOLDEN_RATIO, metadata={
        "help": "Fraction f of the hidden dimensions the HolographicLoss reconstructs from (0 < f < 1)."})
    holographic_ridge: float = field(default=1e-3, metadata={
        "help": "Ridge lambda of the HolographicLoss head, relative to the mean variance of the subset."})

    def __post_init__(self):
        for name in ("resonance_loss_weight", "coherence_loss_weight", "holographic_loss_weight", "holographic_ridge"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a number >= 0")
        if not 0 < self.holographic_subset_fraction < 1:
            raise ValueError(f"holographic_subset_fraction={self.holographic_subset_fraction!r} is invalid: "
                             "expected a number in (0, 1)")

    def weights(self) -> dict[str, float]:
        return {name: float(getattr(self, f"{name}_loss_weight")) for name in AUXILIARY_LOSS_NAMES}

    @property
    def active(self) -> bool:
        return any(weight > 0 for weight in self.weights().values())


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (..., T) values over the positions where mask (B, T) is 1 (broadcast over the middle dims)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).reshape(mask.shape[0], *([1] * (values.dim() - 2)), mask.shape[-1])
    weights = mask.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def resonance_loss(phases: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_res from per-layer (cos theta', sin theta'), each (B, H, T)."""
    if len(phases) < 2:
        raise ValueError(f"the ResonanceLoss compares consecutive layers: needs >= 2 Kuramoto layers, got {len(phases)}")
    cos = torch.stack([c.float() for c, _ in phases])
    sin = torch.stack([s.float() for _, s in phases])
    alignment = cos[1:] * cos[:-1] + sin[1:] * sin[:-1]  # cos(theta'^(l+1) - theta'^(l))
    return _masked_mean((1 - alignment).transpose(0, 1).flatten(1, 2), mask)


def coherence_loss(orders: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_coh from per-layer order parameters r_t, each (B, H, T)."""
    if not orders:
        raise ValueError("the CoherenceLoss needs the Kuramoto order parameter: kuramoto=True")
    order = torch.stack([r.float() for r in orders], dim=1)  # (B, L, H, T)
    return _masked_mean((1 - order).flatten(1, 2), mask)


def holographic_subset(hidden_size: int, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    size = min(hidden_size - 1, max(1, round(fraction * hidden_size)))
    return torch.randperm(hidden_size, generator=generator)[:size].sort().values


def holographic_reconstruction(states: torch.Tensor, subset: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """X W: the states Y (N, d) reconstructed from their dims `subset` by the ridge head fitted on Y itself,
    W = (X^T X + ridge * mean(diag X^T X) I)^(-1) X^T Y with X = Y[:, subset] (float32 or wider)."""
    targets = states if states.dtype in (torch.float32, torch.float64) else states.float()
    inputs = targets[:, subset.to(targets.device)]
    gram = inputs.T @ inputs
    regulariser = ridge * gram.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return inputs @ torch.linalg.solve(gram + regulariser * eye, inputs.T @ targets)


def holographic_loss(hidden_states: torch.Tensor, subset: torch.Tensor, mask: torch.Tensor | None = None,
                     ridge: float = 1e-3) -> torch.Tensor:
    """L_hol of hidden states (B, T, d) reconstructed from the dims `subset` by the closed-form ridge head."""
    targets = hidden_states.float().flatten(0, 1)
    if mask is not None:
        targets = targets[mask.flatten().bool()]
    residual = holographic_reconstruction(targets, subset, ridge) - targets
    return residual.square().sum() / targets.square().sum().clamp(min=1e-12)


def final_norm(model):
    """The last norm of a ResoLLM (under PEFT and DDP wrappers too): its output is the final hidden state."""
    for name, module in model.named_modules():
        if name.endswith("model.norm") or name == "norm":
            return module
    raise ValueError("the HolographicLoss needs a ResoLLM (a module named model.norm holding the final hidden state)")


@contextlib.contextmanager
def capture_resonance(model, phases: bool, hidden: bool):
    """Record, during one forward pass, each Kuramoto layer's (cos theta', sin theta', r) and the final hidden state.

    Yields a dict with lists "phases" (cos, sin), "orders" (r) and "sums" (running [sum cos theta, sum sin theta,
    count], whose first two over the count are the mean field z_t), one entry per Kuramoto layer in order, and
    "hidden"."""
    captured = {"phases": [], "orders": [], "sums": [], "hidden": None}
    handles = []

    def on_kuramoto(module, arguments, output):
        cos, sin, order, sums = output
        captured["phases"].append((cos, sin))
        captured["orders"].append(order)
        captured["sums"].append(sums)

    def on_norm(module, arguments, output):
        captured["hidden"] = output

    try:
        if phases:
            handles += [m.register_forward_hook(on_kuramoto) for m in model.modules() if isinstance(m, ResoLLMKuramoto)]
        if hidden:
            handles.append(final_norm(model).register_forward_hook(on_norm))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class AuxiliaryLosses:
    """The weighted auxiliary terms of one run and their running sums for logging."""

    def __init__(self, arguments: AuxiliaryLossArguments, seed: int = 0):
        self.arguments = arguments
        self.weights = {name: weight for name, weight in arguments.weights().items() if weight > 0}
        self.seed = seed
        self._sums = {name: 0.0 for name in self.weights}
        self._count = 0

    @contextlib.contextmanager
    def capture(self, model):
        with capture_resonance(model, phases=bool({"resonance", "coherence"} & set(self.weights)),
                               hidden="holographic" in self.weights) as captured:
            yield captured

    def terms(self, captured: dict, attention_mask: torch.Tensor | None, step: int) -> dict[str, torch.Tensor]:
        """Each active loss L_i (unweighted) from what `capture` recorded."""
        terms = {}
        if "resonance" in self.weights:
            terms["resonance"] = resonance_loss(captured["phases"], attention_mask)
        if "coherence" in self.weights:
            terms["coherence"] = coherence_loss(captured["orders"], attention_mask)
        if "holographic" in self.weights:
            hidden = captured["hidden"]
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            subset = holographic_subset(hidden.shape[-1], self.arguments.holographic_subset_fraction, generator)
            terms["holographic"] = holographic_loss(hidden, subset, attention_mask, self.arguments.holographic_ridge)
        for name, value in terms.items():
            self._sums[name] += float(value.detach())
        self._count += 1
        return terms

    def weighted_sum(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())

    def pop_log_means(self) -> dict[str, float]:
        """`aux/<name>_loss`: the mean of each term since the last call (empty when none was computed)."""
        if self._count == 0:
            return {}
        means = {f"aux/{name}_loss": total / self._count for name, total in self._sums.items()}
        self._sums = {name: 0.0 for name in self.weights}
        self._count = 0
        return means
