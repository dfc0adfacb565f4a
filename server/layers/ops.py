"""Reference batched adapter ops in plain torch. Faster kernels must keep these signatures and semantics."""
from __future__ import annotations

import torch


def lora_segments(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  ranks: list[int], segments) -> None:
    """For each (slot, token_index): y[idx] += (x[idx] @ A[slot, :r].T) @ B[slot, :r]   (in place).

    y: [num_tokens, out]   x: [num_tokens, in]
    lora_a: [num_slots, max_rank, in]   lora_b: [num_slots, max_rank, out] (B transposed, scaling folded in)
    ranks: the live rank of each slot in this layer; 0 = the slot's adapter does not touch this layer.
    """
    for slot, index in segments:
        r = ranks[slot]
        if r == 0:
            continue
        a = lora_a[slot, :r]  # [r, in]
        b = lora_b[slot, :r]  # [r, out]
        if index is None:
            y += (x.to(a.dtype) @ a.T @ b).to(y.dtype)
        else:
            xs = x.index_select(0, index).to(a.dtype)  # [n, in]
            y.index_add_(0, index, (xs @ a.T @ b).to(y.dtype))


def lora_grouped(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int,
                 groups) -> None:
    """Same result as ``lora_segments`` for the step's slots, as two bmm calls over padded groups.

    Needs rows past each slot's live rank to be zero (AdapterLinear keeps them so): every slot in the group
    range is computed at ``rank`` = the largest live rank there, and the extra rows contribute exactly 0.
    y: [num_tokens, out]   x: [num_tokens, in]   groups: SlotGroups
    """
    g, width = groups.index.shape
    flat = groups.index.view(-1)  # [g * width]
    a = lora_a[groups.lo:groups.hi, :rank]  # [g, r, in]
    b = lora_b[groups.lo:groups.hi, :rank]  # [g, r, out]
    xg = x.index_select(0, flat).view(g, width, -1).to(a.dtype)  # [g, width, in]
    h = torch.bmm(xg, a.transpose(1, 2)).mul_(groups.mask)  # [g, width, r], padding zeroed
    delta = torch.bmm(h, b)  # [g, width, out]
    y.index_add_(0, flat, delta.view(g * width, -1).to(y.dtype))


def scale_rows(t: torch.Tensor, table: torch.Tensor, scale_index: torch.Tensor) -> torch.Tensor:
    """t[i] * table[scale_index[i]]; the identity row holds ones, so unscaled rows are bit-exact.

    t: [num_tokens, dim]   table: [num_slots + 1, dim]   scale_index: [num_tokens]
    """
    return t * table.index_select(0, scale_index).to(t.dtype)


def shift_rows(t: torch.Tensor, table: torch.Tensor, scale_index: torch.Tensor) -> torch.Tensor:
    """t[i] + table[scale_index[i]] (the identity row holds zeros)."""
    return t + table.index_select(0, scale_index).to(t.dtype)
