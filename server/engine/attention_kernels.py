"""The CPU fast path of decode attention: one compiled loop over the paged cache, reading each key and value once
where it lies (numba).

Semantics are ``PagedAttention._decode``'s (gather + SDPA, the reference): for sequence i with context
length L_i and kv head k, each of its G = heads / kv_heads query heads h = k * G + g gets

    out[i, h] = softmax(scale * q[i, h] . K_i[:, k]) @ V_i[:, k]         (over positions 0 .. L_i - 1)

where K_i[p] is the key at slot ``tables[i, p // block_size] * block_size + p % block_size``.
Why: the reference copies every sequence's keys and values out of the pool (index_select), pads them to the
longest sequence and hands the copies to SDPA, so a decode step moves its whole context through memory three
times; here each key row is read once for its G query heads and nothing is copied or padded. Measured on one
core (SmolLM2's 9 heads / 3 kv heads / 64 dims, one layer): 32 sequences of 256 tokens 1.2 ms instead of 4.4,
of 1,024 tokens 5.3 ms instead of 26. It releases the GIL. Prefill chunks stay on SDPA (GEMM-shaped).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

try:  # an optional speed-up: without numba every step takes the torch path, with the same results
    import numba
except ImportError:  # pragma: no cover - numba ships wheels for every platform we build on
    numba = None

SIGNATURE = "void(f4[:, :, ::1], f4[:, :, ::1], f4[:, :, ::1], i8[:, ::1], i8[::1], i8, f4, f4[:, :, ::1])"


def available() -> bool:
    return numba is not None


def _paged_decode(q, keys, values, tables, lengths, block_size, scale, out):
    """q: [n, H, d]  keys, values: [slots, kvh, d]  tables: [n, max_blocks]  lengths: [n]  out: [n, H, d]."""
    n, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    longest = 0
    for i in range(n):
        longest = max(longest, lengths[i])
    scores = np.empty((group, longest), dtype=np.float32)  # [G, L]
    acc = np.empty((group, dim), dtype=np.float32)  # [G, d]
    for i in range(n):
        length = lengths[i]
        for k in range(kv_heads):
            for p in range(length):  # scores: each key row read once for the group's G queries
                slot = tables[i, p // block_size] * block_size + p % block_size
                for g in range(group):
                    h = k * group + g
                    dot = np.float32(0.0)
                    for t in range(dim):
                        dot += q[i, h, t] * keys[slot, k, t]
                    scores[g, p] = dot * scale
            for g in range(group):  # softmax over the sequence's positions
                top = scores[g, 0]
                for p in range(1, length):
                    top = max(top, scores[g, p])
                total = np.float32(0.0)
                for p in range(length):
                    e = np.float32(math.exp(scores[g, p] - top))
                    scores[g, p] = e
                    total += e
                inv = np.float32(1.0) / total
                for p in range(length):
                    scores[g, p] *= inv
                for t in range(dim):
                    acc[g, t] = 0.0
            for p in range(length):  # weighted values: each value row read once
                slot = tables[i, p // block_size] * block_size + p % block_size
                for g in range(group):
                    w = scores[g, p]
                    for t in range(dim):
                        acc[g, t] += w * values[slot, k, t]
            for g in range(group):
                for t in range(dim):
                    out[i, k * group + g, t] = acc[g, t]


@functools.cache
def _compiled():
    """Compiled once per process (numba's on-disk cache makes later starts fast)."""
    # error_model numpy: a non-finite row (a poisoned adapter's own KV) gives NaN for that row, never an exception
    options = dict(nogil=True, fastmath={"reassoc", "contract", "arcp"}, boundscheck=False, error_model="numpy")
    try:
        return numba.njit(SIGNATURE, cache=True, **options)(_paged_decode)
    except RuntimeError:  # no writable cache location: compile for this process
        return numba.njit(SIGNATURE, cache=False, **options)(_paged_decode)


def paged_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: np.ndarray,
                 lengths: np.ndarray, block_size: int, scale: float, out: torch.Tensor) -> None:
    """out = attention of each sequence's one query over its own cached tokens (see the module docstring).

    q, out: [n, heads, dim] float32 (CPU, contiguous)   keys, values: [slots, kv_heads, dim] (the layer's pool)
    tables: [n, max_blocks] int64 block ids   lengths: [n] int64 tokens per sequence (>= 1)
    """
    _compiled()(q.numpy(), keys.numpy(), values.numpy(), tables, lengths, block_size, np.float32(scale),
                out.numpy())


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) before the first request, and check the result."""
    keys = torch.zeros(2, 1, 2)
    values = torch.tensor([[[0.0, 0.0]], [[2.0, 4.0]]])
    out = torch.zeros(1, 1, 2)
    paged_decode(torch.ones(1, 1, 2), keys, values, np.array([[0]], np.int64), np.array([2], np.int64), 2, 1.0, out)
    if not torch.allclose(out, torch.tensor([[[1.0, 2.0]]])):
        raise RuntimeError("the compiled attention kernel gave a wrong result; start with --attention-kernel torch")
