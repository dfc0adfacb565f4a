"""Reference batched adapter ops in plain torch. Faster kernels must keep these signatures and semantics."""
from __future__ import annotations

import torch


def lora_segments(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  ranks: list[int], segments, views=None) -> None:
    """For each (slot, token_index, scale): y[idx] += scale * (x[idx] @ A[slot, :r].T) @ B[slot, :r]   (in place).

    y: [num_tokens, out]   x: [num_tokens, in]
    lora_a: [num_slots, max_rank, in]   lora_b: [num_slots, max_rank, out] (B transposed, scaling folded in)
    ranks: the live rank of each slot in this layer; 0 = the slot's adapter does not touch this layer.
    views: optional (slot, r) -> (A[slot, :r].T, B[slot, :r]), for callers that cache those views.
    """
    for slot, index, scale in segments:
        r = ranks[slot]
        if r == 0:
            continue
        a_t, b = views(slot, r) if views else (lora_a[slot, :r].T, lora_b[slot, :r])  # [in, r], [r, out]
        xs = x if index is None else x.index_select(0, index)  # [n, in]
        if xs.dtype != a_t.dtype:
            xs = xs.to(a_t.dtype)
        if index is None and y.dtype == b.dtype:
            y.addmm_(xs @ a_t, b, alpha=scale)
        elif index is None:
            y += (scale * (xs @ a_t @ b)).to(y.dtype)
        else:
            y.index_add_(0, index, (xs @ a_t @ b).to(y.dtype), alpha=scale)


def lora_grouped(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int,
                 groups) -> None:
    """Same result as ``lora_segments`` for the step's slots, as two bmm calls over padded groups.

    Needs rows past each slot's live rank to be zero (the SlotBank keeps them so): every slot in the group
    range is computed at ``rank`` = the largest live rank there, and the extra rows contribute exactly 0.
    y: [num_tokens, out]   x: [num_tokens, in]   groups: SlotGroups
    """
    a_t = lora_a[groups.lo:groups.hi, :rank].transpose(1, 2)  # [g, in, r]
    b = lora_b[groups.lo:groups.hi, :rank]  # [g, r, out]
    lora_grouped_views(y, x, a_t, b, groups)


def lora_grouped_views(y: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, b: torch.Tensor, groups) -> None:
    """``lora_grouped`` on the slot range already sliced: a_t [g, in, r], b [g, r, out]. Callers keep these
    views across steps (the slot tensors are never reallocated), so a layer spends its ops on the math."""
    g, width = groups.index.shape
    xg = x.index_select(0, groups.flat).view(g, width, -1)  # [g, width, in]
    if xg.dtype != a_t.dtype:
        xg = xg.to(a_t.dtype)
    h = torch.bmm(xg, a_t)  # [g, width, r]
    delta = torch.bmm(h, b).view(g * width, -1)  # [g * width, out]
    if groups.padded:
        # padding entries add exactly 0 to the token they point at, whatever the padded slot holds: select, never
        # multiply (NaN * 0 is NaN, so a non-finite value in one slot would reach another request's row)
        delta = torch.where(groups.keep, delta, 0.0)
    if groups.weight is not None:  # per-entry scales (a mixture, a scaled adapter); padding's is 0 after the select
        delta = delta * groups.weight.to(delta.dtype)
    y.index_add_(0, groups.flat, delta if delta.dtype == y.dtype else delta.to(y.dtype))


def scale_rows(t: torch.Tensor, table: torch.Tensor, scale_index: torch.Tensor) -> torch.Tensor:
    """t[i] * table[scale_index[i]]; the identity row holds ones, so unscaled rows are bit-exact.

    t: [num_tokens, dim]   table: [num_slots + 1, dim]   scale_index: [num_tokens]
    """
    return t * table.index_select(0, scale_index).to(t.dtype)


def shift_rows(t: torch.Tensor, table: torch.Tensor, scale_index: torch.Tensor) -> torch.Tensor:
    """t[i] + table[scale_index[i]] (the identity row holds zeros)."""
    return t + table.index_select(0, scale_index).to(t.dtype)
