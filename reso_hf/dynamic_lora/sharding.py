"""DynamicLoRA on factors sharded by FSDP2 (`fully_shard`, accelerate's FSDP with fsdp_version 2).

Under FSDP2 every factor is a DTensor holding some of its rows on each rank, and its gradient holds the
same rows of the rank-averaged gradient. The dynamics (norms over tiers, importance and screening, vertical
resonance, pattern detection, migrations between tiers) work on whole factors: `whole_factors` gathers each
factor and its gradient for the duration of one dynamics call (every rank then holds the same values, as
under DDP, and computes the same dynamics), and afterwards writes each rank's rows of the result back into
its shard. Factors that are not DTensors (no FSDP, DDP, one process) are left as they are.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


@contextmanager
def whole_factors(layers: dict, adapter_name: str, write_back: bool = True):
    """While active, `layers`' factors of `adapter_name` are whole (gathered) parameters with whole gradients.

    On leaving normally, the shards take the new values (unless `write_back` is False: reading only). If the body
    raises, the shards are put back unchanged and the exception propagates. A collective: every rank enters it.
    """
    swapped = []
    try:
        for layer in layers.values():
            for container in (layer.dynamic_lora_A[adapter_name], layer.dynamic_lora_B[adapter_name]):
                for tier, sharded in list(container.items()):
                    if not isinstance(sharded, DTensor):
                        continue
                    whole = nn.Parameter(sharded.full_tensor(), requires_grad=sharded.requires_grad)
                    if sharded.grad is not None:
                        whole.grad = sharded.grad.full_tensor()
                    whole.sharded_source = sharded  # for the optimizer state, which is kept per shard
                    container[tier] = whole
                    swapped.append((container, tier, sharded, whole))
        yield
        if not write_back:
            return
        with torch.no_grad():
            for _, _, sharded, whole in swapped:
                # every rank holds the same whole factor: each keeps its own rows, no communication
                sharded.copy_(distribute_tensor(whole.detach(), sharded.device_mesh, sharded.placements,
                                                src_data_rank=None))
    finally:
        for container, tier, sharded, _ in swapped:
            container[tier] = sharded
