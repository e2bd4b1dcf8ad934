"""Group-structured attention (README "Group-structured attention"; seed "Quantum Group Symmetries").

Head h has a prime p_h. Query position i may attend key position j iff

    j <= i  and  ((i - j) mod p_h == 0  or  i - j < local_window)

i.e. the keys in the coset i + p_h Z of the cyclic subgroup p_h Z of positions, plus a local window: strided
(dilated) causal attention whose period is the head's prime. With `learned_selection`, every head instead mixes
its attention outputs under each candidate prime with a learned softmax ("adaptive symmetry discovery"); each
candidate is causal, so the mixture is.

The masks are built through transformers' mask interface (`create_causal_mask` with an `and_mask_function`) for
eager/sdpa, which then receive a dense (batch, heads, q, k) mask: the compute stays dense there. Under
`flex_attention` the compute is block-sparse: a strided pattern touches every 128x128 tile of the natural order,
so queries and keys are permuted per head into residue classes mod p_h (x[0::p], x[1::p], ...); in that order
the subgroup part becomes block-diagonal and flex skips the empty tiles. Outputs are permuted back.

Self-contained (copied into checkpoints): only torch/transformers and relative imports.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import (
    _preprocess_mask_arguments,
    and_masks,
    causal_mask_function,
    create_causal_mask,
    packed_sequence_mask_function,
    padding_mask_function,
    prepare_padding_mask,
)
from transformers.models.llama.modeling_llama import repeat_kv
from transformers.utils import is_torch_flex_attn_available

from .primes import first_primes

if is_torch_flex_attn_available():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

GROUP_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")


def head_primes(config) -> tuple[int, ...]:
    """The prime of every attention head: `group_attention.primes`, or the first `num_attention_heads` primes."""
    primes = config.group_attention.primes
    return first_primes(config.num_attention_heads) if primes == "auto" else tuple(primes)


def candidate_primes(config) -> tuple[int, ...]:
    """The distinct head primes, ascending: the choices of `learned_selection`."""
    return tuple(sorted(set(head_primes(config))))


def cyclic_subgroup_overlay(prime: int, local_window: int):
    """Mask function (transformers' signature) of the coset pattern: distance a multiple of `prime`, or closer
    than `local_window`. Combine it with the causal function: alone it also admits future multiples."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance % prime == 0) | (distance < local_window)

    return inner_mask


def per_head_subgroup_overlay(primes: torch.Tensor, local_window: int):
    """`cyclic_subgroup_overlay` with a prime per head index (for flex block masks, which carry the head)."""

    def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance % primes[head_idx] == 0) | (distance < local_window)

    return inner_mask


def group_attention_reference(primes, local_window: int, length: int) -> torch.Tensor:
    """(heads, length, length) bool: the definition written out position by position (tests, benchmark)."""
    mask = torch.zeros(len(primes), length, length, dtype=torch.bool)
    for head, prime in enumerate(primes):
        for i in range(length):
            for j in range(i + 1):
                mask[head, i, j] = (i - j) % prime == 0 or i - j < local_window
    return mask


def attended_fraction(primes, local_window: int, length: int) -> float:
    """Share of the causal (query, key) pairs the group pattern keeps, averaged over heads."""
    causal = length * (length + 1) / 2
    distances = torch.arange(length, dtype=torch.float64)
    pairs_at = length - distances  # pairs (i, j) with i - j = d
    kept = [float(pairs_at[(distances % p == 0) | (distances < local_window)].sum()) for p in primes]
    return sum(kept) / (len(primes) * causal)


class ResoLLMPrimeSelection(nn.Module):
    """Adaptive symmetry discovery: per head, softmax weights over the candidate primes, mixing that head's
    attention outputs under each candidate's mask. Starts uniform (logits 0)."""

    def __init__(self, num_heads: int, num_candidates: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_heads, num_candidates))

    def forward(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=-1)


@dataclass
class _Pass:
    """One attention call: its mask and, for the block-sparse flex pass, the per-head residue-class orders."""

    mask: object
    query_order: torch.Tensor | None = None  # (heads, q): natural query index at each permuted slot
    key_order: torch.Tensor | None = None
    query_inverse: torch.Tensor | None = None  # (heads, q): permuted slot of each natural query index

    def attend(self, module, interface, query, key, value, **kwargs):
        if self.query_order is None:
            return interface(module, query, key, value, self.mask, **kwargs)
        batch, heads, _, dim = query.shape
        # Per-head orders differ inside a key/value group, so the shared heads are expanded first.
        key = repeat_kv(key, heads // key.shape[1])
        value = repeat_kv(value, heads // value.shape[1])
        query = query.gather(2, self.query_order[None, :, :, None].expand(batch, -1, -1, dim))
        key = key.gather(2, self.key_order[None, :, :, None].expand(batch, -1, -1, dim))
        value = value.gather(2, self.key_order[None, :, :, None].expand(batch, -1, -1, value.shape[-1]))
        output, weights = interface(module, query, key, value, self.mask, **kwargs)  # output (B, q, H, D)
        inverse = self.query_inverse.transpose(0, 1)[None, :, :, None]
        return output.gather(1, inverse.expand(batch, -1, -1, output.shape[-1])), weights


@dataclass
class GroupAttentionMask:
    """What every attention layer receives in place of the causal mask when `group_attention.enabled`.

    Fixed primes: one pass whose mask gives each head its own prime. `learned_selection`: one pass per
    candidate prime (all heads), mixed per head by the layer's `ResoLLMPrimeSelection`."""

    passes: list
    learned: bool

    def routed(self, interface):
        """An attention-interface callable that runs ``interface`` through these passes."""

        def group_interface(module, query, key, value, attention_mask, **kwargs):
            return self.attend(module, interface, query, key, value, **kwargs)

        return group_interface

    def attend(self, module, interface, query, key, value, **kwargs):
        results = [p.attend(module, interface, query, key, value, **kwargs) for p in self.passes]
        if not self.learned:
            return results[0]
        mix = module.group_selection()  # (heads, candidates)
        outputs = torch.stack([output for output, _ in results])  # (C, B, q, H, D)
        output = torch.einsum("cbqhd,hc->bqhd", outputs, mix.to(outputs.dtype))
        weights = None
        if results[0][1] is not None:
            stacked = torch.stack([w for _, w in results])  # (C, B, H, q, k)
            weights = torch.einsum("cbhqk,hc->bhqk", stacked, mix.to(stacked.dtype))
        return output, weights


def _residue_order(positions: torch.Tensor, primes: torch.Tensor) -> torch.Tensor:
    """(heads, n): indices sorting `positions` by residue mod each head's prime, position order kept within."""
    residues = positions[None, :] % primes[:, None]
    return torch.argsort(residues, dim=-1, stable=True)


def _flex_pass(config, inputs_embeds, attention_mask, past_key_values, position_ids, primes: torch.Tensor):
    early_exit, attention_mask, packed, q_length, kv_length, q_offset, kv_offset = _preprocess_mask_arguments(
        config, inputs_embeds, attention_mask, past_key_values, position_ids, 0
    )
    if early_exit:
        raise ValueError("group_attention under flex_attention builds its own block mask: pass a 2D attention_mask")
    device = inputs_embeds.device
    primes = primes.to(device)
    overlay = per_head_subgroup_overlay(primes, config.group_attention.local_window)
    mask_function = and_masks(causal_mask_function, overlay)
    if attention_mask is not None and not bool(attention_mask.all()):
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        mask_function = and_masks(mask_function, padding_mask_function(padding))
    if packed is not None:  # packed documents (position ids restart): no attention across a boundary
        mask_function = and_masks(mask_function, packed_sequence_mask_function(packed))
    query_positions = torch.arange(q_length, device=device) + q_offset
    key_positions = torch.arange(kv_length, device=device) + kv_offset
    heads = len(primes)
    # Each head is laid out in natural order and in residue order (2 * heads rows of one block mask); it keeps the
    # order with fewer non-empty tiles (residue order wins on long sequences, natural order on short ones).
    both_query_order = torch.cat([torch.arange(q_length, device=device).expand(heads, -1),
                                  _residue_order(query_positions, primes)])
    both_key_order = torch.cat([torch.arange(kv_length, device=device).expand(heads, -1),
                                _residue_order(key_positions, primes)])

    def both_orders_mask(batch_idx, head_idx, q_idx, kv_idx):
        return mask_function(batch_idx, head_idx % heads, query_positions[both_query_order[head_idx, q_idx]],
                             key_positions[both_key_order[head_idx, kv_idx]])

    both = create_block_mask(both_orders_mask, B=inputs_embeds.shape[0], H=2 * heads, Q_LEN=q_length,
                             KV_LEN=kv_length, device=device, _compile=q_length * kv_length > 2**20)
    tiles = (both.kv_num_blocks + both.full_kv_num_blocks).sum(dim=(0, 2))
    chosen = torch.arange(heads, device=device) + heads * (tiles[heads:] < tiles[:heads]).long()
    query_order, key_order = both_query_order[chosen], both_key_order[chosen]

    def permuted_mask(batch_idx, head_idx, q_idx, kv_idx):
        return mask_function(batch_idx, head_idx, query_positions[query_order[head_idx, q_idx]],
                             key_positions[key_order[head_idx, kv_idx]])

    block_mask = BlockMask.from_kv_blocks(
        both.kv_num_blocks[:, chosen], both.kv_indices[:, chosen], both.full_kv_num_blocks[:, chosen],
        both.full_kv_indices[:, chosen], BLOCK_SIZE=both.BLOCK_SIZE, seq_lengths=(q_length, kv_length),
        mask_mod=permuted_mask,
    )
    query_inverse = torch.argsort(query_order, dim=-1)
    return _Pass(block_mask, query_order, key_order, query_inverse)


def create_group_attention_mask(config, inputs_embeds, attention_mask, past_key_values, position_ids,
                                dense_transform=None) -> GroupAttentionMask:
    """The group-structured masks for one forward pass (shared by all layers).

    ``dense_transform`` is applied to each (batch, 1, q, k) candidate mask on the dense path before the per-head
    assembly (the model prepends its always-visible prefix slots there)."""
    implementation = config._attn_implementation
    if implementation not in GROUP_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"group_attention.enabled needs attn_implementation in {GROUP_ATTENTION_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    settings = config.group_attention
    candidates = candidate_primes(config)
    per_head = head_primes(config)
    if implementation == "flex_attention":
        if dense_transform is not None:
            raise ValueError("group_attention with attn_implementation='flex_attention' does not support prefix "
                             "slots (agency / temporal_smf): use 'sdpa' or 'eager'")
        heads = config.num_attention_heads
        prime_sets = [[p] * heads for p in candidates] if settings.learned_selection else [list(per_head)]
        passes = [_flex_pass(config, inputs_embeds, attention_mask, past_key_values, position_ids,
                             torch.tensor(primes)) for primes in prime_sets]
        return GroupAttentionMask(passes, settings.learned_selection)

    dense = []
    for prime in candidates:
        mask = create_causal_mask(config, inputs_embeds, attention_mask, past_key_values, position_ids=position_ids,
                                  and_mask_function=cyclic_subgroup_overlay(prime, settings.local_window))
        dense.append(mask if dense_transform is None else dense_transform(mask))
    if settings.learned_selection:
        return GroupAttentionMask([_Pass(mask) for mask in dense], True)
    index = {prime: c for c, prime in enumerate(candidates)}
    batch = max(mask.shape[0] for mask in dense)
    per_head_mask = torch.cat([dense[index[p]].expand(batch, -1, -1, -1) for p in per_head], dim=1)
    return GroupAttentionMask([_Pass(per_head_mask)], False)
