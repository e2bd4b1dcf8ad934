"""Pattern detection, migration between tiers, the bandwidth queue and the rollback ring (SPEC §5.4-§5.5).

All linear algebra works on the low-rank factors: a tier's delta W = s B A (out x in) is never formed. Its
top-k left singular subspace comes from a QR of B and of A^T followed by the SVD of an r x r core.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch

# ----- subspaces -------------------------------------------------------------------------------------------


def low_rank_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of the product `left @ right` (out x m times m x in) without forming it.

    Returns (U, S, Vh) with U (out x p), S (p,), Vh (p x in), p = min(out, in, m), such that
    U diag(S) Vh == left @ right. Cost O((out + in) m^2), memory O((out + in) m).
    """
    q_left, r_left = torch.linalg.qr(left, mode="reduced")  # out x a, a x m
    q_right, r_right = torch.linalg.qr(right.T, mode="reduced")  # in x b, b x m
    core = r_left @ r_right.T  # a x b
    u_core, singular_values, vh_core = torch.linalg.svd(core, full_matrices=False)
    return q_left @ u_core, singular_values, vh_core @ q_right.T


# Singular directions weaker than this fraction of the strongest one are numerically absent: an arbitrary
# basis of a null space would make the autocorrelation of a perfectly stable low-rank pattern look random.
RELATIVE_RANK_TOLERANCE = 1e-3


def top_subspace(factor_b: torch.Tensor, factor_a: torch.Tensor, scaling: float, k: int) -> tuple[torch.Tensor, float]:
    """Top-k left singular subspace U (out x k', orthonormal columns) of s B A, and the Frobenius norm of s B A.

    k' = min(k, numerical rank of s B A).
    """
    u, singular_values, _ = low_rank_svd(scaling * factor_b.float(), factor_a.float())
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return u[:, :0], 0.0
    numerical_rank = int((singular_values > RELATIVE_RANK_TOLERANCE * singular_values[0]).sum())
    k = min(k, numerical_rank)
    return u[:, :k], float(torch.linalg.vector_norm(singular_values))


def subspace_autocorrelation(current: torch.Tensor, previous: torch.Tensor) -> float:
    """||U_t^T U_{t-1}||_F^2 / k: 1 for the same subspace, about k / out for unrelated random subspaces."""
    # divide by the larger dimension: a subspace that gained or lost directions is not the same pattern
    k = max(current.shape[1], previous.shape[1])
    if k == 0:
        return 0.0
    overlap = current.T @ previous
    return float((overlap**2).sum()) / k


# ----- migration of one pattern ----------------------------------------------------------------------------


@dataclass
class MigrationResult:
    """New factors of the source and destination tiers plus the measured truncation error."""

    source_a: torch.Tensor
    source_b: torch.Tensor
    target_a: torch.Tensor
    target_b: torch.Tensor
    truncation_error: float  # ||(dW_dst + eta P) - truncated||_F: the exact change of the summed delta W
    relative_truncation_error: float
    moved_norm: float  # ||eta P||_F


def migrate_pattern(
    source_a: torch.Tensor,
    source_b: torch.Tensor,
    source_scaling: float,
    target_a: torch.Tensor,
    target_b: torch.Tensor,
    target_scaling: float,
    subspace: torch.Tensor,
    rate: float,
) -> MigrationResult:
    """Move eta * P, P = U U^T dW_src, from the source tier into the target tier.

    The source keeps A and loses the projected part of B exactly: B_src' = B_src - eta U (U^T B_src), so
    dW_src' = dW_src - eta P. The target becomes the rank-r_dst truncated SVD of dW_dst + eta P, computed from
    the stacked factors [s_d B_d, eta U U^T s_s B_s] [A_d; A_s]. The sum dW_src + dW_dst therefore changes by
    exactly the discarded singular values, whose norm is returned as the truncation error.
    """
    dtype = source_b.dtype
    u = subspace.to(torch.float32)
    b_src = source_b.float()
    a_src = source_a.float()
    b_dst = target_b.float()
    a_dst = target_a.float()
    projected_b = u @ (u.T @ b_src)  # out x r_src: U U^T B_src
    new_source_b = b_src - rate * projected_b
    moved_left = rate * source_scaling * projected_b
    stacked_left = torch.cat([target_scaling * b_dst, moved_left], dim=1)
    stacked_right = torch.cat([a_dst, a_src], dim=0)
    u_full, singular_values, vh_full = low_rank_svd(stacked_left, stacked_right)
    target_rank = b_dst.shape[1]
    kept = min(target_rank, singular_values.shape[0])
    discarded = singular_values[kept:]
    truncation_error = float(torch.linalg.vector_norm(discarded)) if discarded.numel() else 0.0
    total_norm = float(torch.linalg.vector_norm(singular_values))
    # Split the kept singular values evenly between the factors; directions with a zero singular value keep
    # a unit-norm A row (and a zero B column) so that those rank slots can still learn.
    root = singular_values[:kept].sqrt()
    alive = root > 0
    row_norm = 1.0 / math.sqrt(max(a_dst.shape[1], 1))
    a_rows = torch.where(alive[:, None], root[:, None] * vh_full[:kept], row_norm * vh_full[:kept])
    b_cols = u_full[:, :kept] * root[None, :] / target_scaling
    new_target_a = a_dst.clone()
    new_target_b = torch.zeros_like(b_dst)
    new_target_a[:kept] = a_rows
    new_target_b[:, :kept] = b_cols
    # Rank slots beyond what the product can hold (target rank > min(out, in)) keep their old A rows with a
    # zero B column: they contribute nothing, exactly as before, and stay trainable.
    return MigrationResult(
        source_a=source_a.detach().clone(),
        source_b=new_source_b.to(dtype),
        target_a=new_target_a.to(dtype),
        target_b=new_target_b.to(dtype),
        truncation_error=truncation_error,
        relative_truncation_error=truncation_error / total_norm if total_norm > 0 else 0.0,
        moved_norm=_product_norm(moved_left, a_src),
    )


def _product_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """||left @ right||_F from the two Gram matrices (no out x in matrix)."""
    value = float(((left.T @ left) * (right @ right.T)).sum())
    return math.sqrt(max(value, 0.0))


# ----- bandwidth queue -------------------------------------------------------------------------------------


@dataclass
class MigrationRequest:
    request_id: int
    module: str
    source: str
    target: str
    priority: float  # autocorrelation of the stable pattern, in [0, 1]
    criticality: float  # in [0, 1]; >= emergency threshold bypasses the bandwidth limit
    size: int  # parameters of the source tier in this module
    enqueued_tick: int
    fast_track: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ChannelStats:
    admitted: int = 0
    bypassed: int = 0
    admitted_alone: int = 0


class MigrationQueue:
    """Priority queue of migration requests with one token-bucket channel per source tier.

    Each tick a channel's credit becomes `refill * credit + budget` (budget = bandwidth x the source tier's
    parameter count), so unused credit decays and a burst is bounded by `budget / (1 - refill)`. Requests are
    served in order of `priority + aging * waited_ticks` (aging prevents starvation behind newer requests).
    Per channel, only the head request may be admitted (no overtaking, so a large request is never passed
    forever by small ones); it is admitted when the credit covers its size, or, if it is larger than the
    credit can ever reach, alone on an otherwise idle channel whose credit is not negative (the credit then
    goes into debt that later ticks repay). Requests with criticality >= `emergency_criticality` bypass the
    credit check (and still pay into it). Every accepted request is therefore admitted after finitely many
    ticks once arrivals stop.
    """

    def __init__(
        self,
        budgets: dict[str, float],
        refill: float,
        aging: float,
        max_size: int,
        emergency_criticality: float,
    ) -> None:
        self.budgets = {name: float(value) for name, value in budgets.items()}
        self.refill = float(refill)
        self.aging = float(aging)
        self.max_size = int(max_size)
        self.emergency_criticality = float(emergency_criticality)
        self.credits: dict[str, float] = {name: 0.0 for name in self.budgets}
        self.pending: list[MigrationRequest] = []
        self.next_request_id = 0
        self.rejected = 0
        self.total_admitted = 0
        self.total_wait = 0
        self.recent_waits: deque[int] = deque(maxlen=100)
        self.stats: dict[str, ChannelStats] = {name: ChannelStats() for name in self.budgets}

    def credit_cap(self, channel: str) -> float:
        return self.budgets[channel] / (1.0 - self.refill)

    def submit(
        self,
        module: str,
        source: str,
        target: str,
        priority: float,
        criticality: float,
        size: int,
        tick: int,
        fast_track: bool = False,
    ) -> Optional[MigrationRequest]:
        """Accept a request (or refresh the pending one for the same module and source); None if rejected."""
        if source not in self.budgets:
            raise ValueError(f"No migration channel for source tier {source!r}; channels: {sorted(self.budgets)}.")
        for request in self.pending:
            if request.module == module and request.source == source:
                request.priority = max(request.priority, float(priority))
                request.criticality = max(request.criticality, float(criticality))
                request.fast_track = request.fast_track or fast_track
                return request
        if len(self.pending) >= self.max_size:
            self.rejected += 1
            return None
        request = MigrationRequest(
            request_id=self.next_request_id,
            module=module,
            source=source,
            target=target,
            priority=float(priority),
            criticality=float(criticality),
            size=int(size),
            enqueued_tick=int(tick),
            fast_track=fast_track,
        )
        self.next_request_id += 1
        self.pending.append(request)
        return request

    def tick(self, now: int) -> list[MigrationRequest]:
        """Advance one tick: refill the channels and return the requests admitted now, in service order."""
        for channel, budget in self.budgets.items():
            self.credits[channel] = self.refill * self.credits[channel] + budget
        order = sorted(
            self.pending,
            key=lambda r: (-(r.priority + self.aging * (now - r.enqueued_tick)), r.request_id),
        )
        admitted: list[MigrationRequest] = []
        blocked: set[str] = set()
        used: set[str] = set()
        for request in order:
            channel = request.source
            bypass = request.criticality >= self.emergency_criticality or request.fast_track
            if bypass:
                self.credits[channel] -= request.size
                self.stats[channel].bypassed += 1
            elif channel in blocked:
                continue
            elif self.credits[channel] >= request.size:
                self.credits[channel] -= request.size
            elif (
                channel not in used
                and self.credits[channel] >= 0
                and request.size > 0.9 * self.credit_cap(channel)
            ):
                # Larger than the bucket can usefully hold: admitted alone; the debt protects the next ticks.
                self.credits[channel] -= request.size
                self.stats[channel].admitted_alone += 1
                blocked.add(channel)
            else:
                blocked.add(channel)
                continue
            used.add(channel)
            admitted.append(request)
        admitted_ids = {r.request_id for r in admitted}
        self.pending = [r for r in self.pending if r.request_id not in admitted_ids]
        for request in admitted:
            wait = now - request.enqueued_tick
            self.total_admitted += 1
            self.total_wait += wait
            self.recent_waits.append(wait)
            self.stats[request.source].admitted += 1
        return admitted

    @property
    def depth(self) -> int:
        return len(self.pending)

    def average_wait(self, now: Optional[int] = None) -> float:
        """Mean wait of the last 100 admitted requests, counting pending requests' waits so far when `now` is given."""
        waits = list(self.recent_waits)
        if now is not None:
            waits += [now - r.enqueued_tick for r in self.pending]
        return sum(waits) / len(waits) if waits else 0.0

    # ----- persistence -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "credits": dict(self.credits),
            "pending": [r.to_dict() for r in self.pending],
            "next_request_id": self.next_request_id,
            "rejected": self.rejected,
            "total_admitted": self.total_admitted,
            "total_wait": self.total_wait,
            "recent_waits": list(self.recent_waits),
            "stats": {name: asdict(s) for name, s in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.credits = {name: float(v) for name, v in state["credits"].items()}
        self.pending = [MigrationRequest(**r) for r in state["pending"]]
        self.next_request_id = int(state["next_request_id"])
        self.rejected = int(state["rejected"])
        self.total_admitted = int(state["total_admitted"])
        self.total_wait = int(state["total_wait"])
        self.recent_waits = deque((int(w) for w in state["recent_waits"]), maxlen=100)
        self.stats = {name: ChannelStats(**s) for name, s in state["stats"].items()}


# ----- rollback ring ---------------------------------------------------------------------------------------


@dataclass
class RollbackPoint:
    """The exact tensors that one migration overwrote, so that it can be undone bit for bit."""

    point_id: int
    step: int
    module: str
    tiers: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "<tier>.<A|B|init_A|init_B>" -> tensor

    def describe(self) -> dict:
        return {"point_id": self.point_id, "step": self.step, "module": self.module, "tiers": list(self.tiers),
                "keys": sorted(self.tensors)}


class RollbackRing:
    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.points: deque[RollbackPoint] = deque(maxlen=self.capacity)
        self.next_point_id = 0

    def push(self, step: int, module: str, tiers: Iterable[str], tensors: dict[str, torch.Tensor]) -> RollbackPoint:
        point = RollbackPoint(
            point_id=self.next_point_id,
            step=step,
            module=module,
            tiers=list(tiers),
            tensors={k: v.detach().clone() for k, v in tensors.items()},
        )
        self.next_point_id += 1
        self.points.append(point)
        return point

    def pop_latest(self, count: int) -> list[RollbackPoint]:
        if count < 0:
            raise ValueError(f"rollback count must be >= 0, got {count}.")
        if count > len(self.points):
            raise ValueError(
                f"Cannot roll back {count} migrations: the ring holds {len(self.points)} "
                f"(capacity {self.capacity})."
            )
        return [self.points.pop() for _ in range(count)]

    def __len__(self) -> int:
        return len(self.points)
