"""Consolidation of the fast tiers into the memory tiers, and the protected subspaces (README "Consolidation").

For one module with tiers t = 1..T (slowest first), scalings s_t and memory tiers 1..N (ranks r_1..r_N,
R_M = r_1 + ... + r_N):

    D = sum_t s_t B_t A_t = U diag(sigma) V^T                       (SVD of the whole adapter's delta W)
    memory tier i <- the directions k = R_{i-1} + 1 .. R_i of the rank-R_M truncation (R_i = r_1 + ... + r_i):
        s_i B_i = U_i diag(sigma_i)^(1/2) c_i^-1,   A_i = c_i diag(sigma_i)^(1/2) V_i^T
    fast tiers  <- B = 0, A fresh (LoRA's Kaiming-uniform initialisation)

so the summed delta W changes by exactly the discarded singular values: ||D - D'||_F = ||sigma_{> R_M}||, the
measured truncation error. The protected subspaces are the memory's column space span(U_{<= R_M}) and row space
span(V_{<= R_M}) (numerically non-zero directions only). Everything works on the factors: the out x in matrix is
never formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .migration import RELATIVE_RANK_TOLERANCE, low_rank_svd


@dataclass
class FoldResult:
    """New memory-tier factors of one module, its protected bases and the measured truncation error."""

    memory_factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # tier -> (A, B)
    column_basis: torch.Tensor  # out x k, orthonormal columns: the memory's column space
    row_basis: torch.Tensor  # in x k, orthonormal columns: the memory's row space
    truncation_error: float  # ||D - D'||_F
    relative_truncation_error: float  # ||D - D'||_F / ||D||_F (0 when D = 0)
    kept_rank: int  # numerically non-zero directions kept in the memory tiers


def fold_into_memory(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    memory_tiers: list[str],
) -> FoldResult:
    """Fold the summed delta W of all `factors` (tier -> (A, B, s), every tier of the module) into `memory_tiers`.

    The strongest directions go to the slowest memory tier (the first in the list). A direction's singular value is
    split between the factors as sqrt(sigma) each (A rows at least 1/sqrt(in) long, so that a weak direction's slot
    can still learn); rank slots left without a direction keep their A row and get a zero B column.
    """
    left = torch.cat([float(s) * b.float() for _, b, s in factors.values()], dim=1)
    right = torch.cat([a.float() for a, _, _ in factors.values()], dim=0)
    u, sigma, vh = low_rank_svd(left, right)
    capacity = sum(factors[t][0].shape[0] for t in memory_tiers)
    kept = min(capacity, sigma.numel())
    total_norm = float(torch.linalg.vector_norm(sigma))
    truncation = float(torch.linalg.vector_norm(sigma[kept:])) if sigma.numel() > kept else 0.0
    in_features = right.shape[1]
    min_row_norm = 1.0 / math.sqrt(max(in_features, 1))
    memory_factors = {}
    offset = 0
    for tier in memory_tiers:
        old_a, old_b, scaling = factors[tier]
        rank = old_a.shape[0]
        count = max(0, min(rank, kept - offset))
        new_a = old_a.detach().float().clone()
        new_b = torch.zeros_like(old_b, dtype=torch.float32)
        if count:
            values = sigma[offset: offset + count]
            row_norm = values.sqrt().clamp(min=min_row_norm)  # A row length; B carries sigma / row_norm / s
            new_a[:count] = row_norm[:, None] * vh[offset: offset + count]
            new_b[:, :count] = u[:, offset: offset + count] * (values / row_norm)[None, :] / float(scaling)
        memory_factors[tier] = (new_a.to(old_a.dtype), new_b.to(old_b.dtype))
        offset += rank
    alive = int((sigma[:kept] > RELATIVE_RANK_TOLERANCE * sigma[0]).sum()) if kept and float(sigma[0]) > 0 else 0
    return FoldResult(
        memory_factors=memory_factors,
        column_basis=u[:, :alive].contiguous(),
        row_basis=vh[:alive].T.contiguous(),
        truncation_error=truncation,
        relative_truncation_error=truncation / total_norm if total_norm > 0 else 0.0,
        kept_rank=alive,
    )


def remove_column_component(update_b: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """u_B - gamma Q (Q^T u_B): a B update (out x r) with gamma of its part in span(Q) (Q: out x k) removed."""
    if basis.shape[1] == 0 or strength == 0.0:
        return update_b
    q = basis.to(device=update_b.device, dtype=update_b.dtype)
    return update_b - strength * (q @ (q.T @ update_b))


def remove_row_component(update_a: torch.Tensor, basis: torch.Tensor, strength: float) -> torch.Tensor:
    """u_A - gamma (u_A V) V^T: an A update (r x in) with gamma of its part in span(V) (V: in x k) removed."""
    if basis.shape[1] == 0 or strength == 0.0:
        return update_a
    v = basis.to(device=update_a.device, dtype=update_a.dtype)
    return update_a - strength * ((update_a @ v) @ v.T)
