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


def scale_rows(t: torch.Tensor, table: torch.Tensor, scale_index: torch.Tensor) -> torch.Tensor:
    """t[i] * table[scale_index[i]]; the identity row holds ones, so unscaled rows are bit-exact.

    t: [num_tokens, dim]   table: [num_slots + 1, dim]   scale_index: [num_tokens]
    """
    return t * table.index_select(0, scale_index).to(t.dtype)


def shift_rows(t: torch.Tensor, table: torch.Tensor, scale_index: torch.Tensor) -> torch.Tensor:
    """t[i] + table[scale_index[i]] (the identity row holds zeros)."""
    return t + table.index_select(0, scale_index).to(t.dtype)
