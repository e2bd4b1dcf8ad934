"""Vertical and horizontal resonance (SPEC §5.7).

Vertical: the cosine between a fast tier's realised update and the next slower tier's delta W, from factor
Gram matrices (never the out x in matrices). Horizontal: under torch.distributed each rank is one agent; the
swarm tier is synchronised by a resonance-weighted all-reduce of the ranks' realised updates.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def low_rank_inner(left_1: torch.Tensor, right_1: torch.Tensor, left_2: torch.Tensor, right_2: torch.Tensor) -> float:
    """<L1 R1, L2 R2>_F = sum((L1^T L2) * (R1 R2^T)) for L (out x m) and R (m x in)."""
    return float(((left_1.T @ left_2) * (right_1 @ right_2.T)).sum())


def update_cosine(
    new_a: torch.Tensor,
    new_b: torch.Tensor,
    old_a: torch.Tensor,
    old_b: torch.Tensor,
    fast_scaling: float,
    slow_a: torch.Tensor,
    slow_b: torch.Tensor,
    slow_scaling: float,
) -> tuple[float, float, float]:
    """Cosine between s_f (B_new A_new - B_old A_old) and s_s B_s A_s, with both norms.

    Returns (inner, norm of the update, norm of the slow delta W); the cosine is inner / (n1 n2). Both
    products are written as L R with stacked factors, and a single Gram matrix of [L_update, L_slow] and of
    [R_update; R_slow] yields all three Frobenius inner products.
    """
    rank_update = new_b.shape[1] + old_b.shape[1]
    left = torch.cat([fast_scaling * new_b, -fast_scaling * old_b, slow_scaling * slow_b], dim=1).float()
    right = torch.cat([new_a, old_a, slow_a], dim=0).float()
    products = (left.T @ left) * (right @ right.T)  # entry (i, j): <l_i r_i, l_j r_j>_F
    update_sq = float(products[:rank_update, :rank_update].sum())
    inner = float(products[:rank_update, rank_update:].sum())
    slow_sq = float(products[rank_update:, rank_update:].sum())
    return inner, math.sqrt(max(update_sq, 0.0)), math.sqrt(max(slow_sq, 0.0))


def horizontal_weight(alignment: float, amplification: float, dampening: float) -> float:
    """Resonance weight of one rank's update: clamp(1 + alpha a, 0, 2) if a > 0, else 1 - beta |a|."""
    if alignment > 0:
        return min(max(1.0 + amplification * alignment, 0.0), 2.0)
    return max(1.0 - dampening * abs(alignment), 0.0)


def distributed_world() -> tuple[bool, int, int]:
    """(active, world size, rank) of the default process group."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_world_size(), dist.get_rank()
    return False, 1, 0


def resonance_all_reduce(
    old_flat: torch.Tensor, new_flat: torch.Tensor, amplification: float, dampening: float
) -> tuple[torch.Tensor, float, float]:
    """Synchronise one tier across ranks; returns (synchronised values, this rank's alignment, weight).

    u_r = new_r - old_r is the rank's realised update; the consensus direction is the mean update; each
    rank's update is weighted by its resonance weight; the result mean(old) + sum_r w_r u_r / N is identical
    on every rank (the mean of old also heals any drift between ranks).
    """
    world = dist.get_world_size()
    update = new_flat - old_flat
    consensus = update.clone()
    dist.all_reduce(consensus, op=dist.ReduceOp.SUM)
    consensus /= world
    update_norm = torch.linalg.vector_norm(update)
    consensus_norm = torch.linalg.vector_norm(consensus)
    if float(update_norm) > 0 and float(consensus_norm) > 0:
        alignment = float(torch.dot(update, consensus) / (update_norm * consensus_norm))
    else:
        alignment = 0.0
    weight = horizontal_weight(alignment, amplification, dampening)
    weighted = update * weight
    dist.all_reduce(weighted, op=dist.ReduceOp.SUM)
    base = old_flat.clone()
    dist.all_reduce(base, op=dist.ReduceOp.SUM)
    return base / world + weighted / world, alignment, weight


def average_all_reduce(values: torch.Tensor) -> torch.Tensor:
    reduced = values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()
