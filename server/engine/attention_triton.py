"""The GPU's decode attention: one Triton kernel reading each sequence's cached keys and values in place through
its block table, with an online softmax over its blocks.

Semantics are ``PagedAttention._decode``'s (gather + SDPA, the reference) and attention_kernels.py's: for sequence
i with context length L_i and kv head k, each of its G = heads / kv_heads query heads h = k * G + g (Hugging
Face's repeat_kv order) gets

    out[i, h] = softmax(scale * q[i, h] . K_i[:, k]) @ V_i[:, k]         (over positions 0 .. L_i - 1)

where K_i[p] is the key at slot ``tables[i, p // block_size] * block_size + p % block_size``.

One program per (sequence, kv head): it holds the G queries of that kv head, walks the sequence's tokens in
tiles of TILE positions (ceil(L_i / TILE) of them, a bound read from ``lengths`` on the device; each position
looks up its block in the table, so a tile spans several blocks or part of one, and any block size works) and
keeps per query a running max, a running sum and a float32 accumulator (the online softmax): each key and value
row is read once for its G queries, nothing is gathered or padded, and no score vector longer than one tile
exists. Positions past L_i are masked at the loads (table entries included), so the null block a table is padded
with, and whatever lies past a sequence's end in its last block, is never read. The launch's shapes depend on
the number of sequences only: tables may be wider than any sequence needs, which is what a CUDA graph captured
per batch-size bucket needs (fixed ``[bucket, max_blocks]`` tables and ``[bucket]`` lengths in persistent
buffers).

Products are elementwise multiplies and sums in float32 (not ``tl.dot``: a decode query block is G <= 16 rows,
below a tensor-core tile, and the interpreter's bfloat16 ``tl.dot`` is wrong in triton 3.9). Untuned: no GPU has
run it yet; TILE keeps the [G, TILE, dim] product within TILE_ELEMENTS (a guess at what stays in registers),
num_warps is Triton's default.

Without a GPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported): how the
tests check it against the reference on CPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TILE_ELEMENTS = 8192  # the largest [G, TILE, dim] product a program forms (untuned)
MAX_TILE = 128  # positions per tile at most


def tile(group: int, dim: int) -> int:
    """Positions per tile: a power of two, 16 to MAX_TILE, the product [G, TILE, dim] within TILE_ELEMENTS."""
    fit = TILE_ELEMENTS // (triton.next_power_of_2(group) * triton.next_power_of_2(dim))
    return max(16, min(MAX_TILE, triton.next_power_of_2(fit + 1) // 2))


def usable(device: torch.device) -> bool:
    """Triton runs the kernel on CUDA devices, and on CPU tensors only under its interpreter (the tests)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def paged_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, block_size: int, scale: float | None, out: torch.Tensor,
                 tile_size: int | None = None) -> None:
    """out = attention of each sequence's one query over its own cached tokens (see the module docstring).

    q, out: [n, heads, dim] (any strides; out may be a view of the layer's output)
    keys, values: [slots, kv_heads, dim] the layer's pools, slots = num_blocks * block_size
    tables: [n, max_blocks] int32/int64 block ids (any width >= each sequence's blocks; padding is never read)
    lengths: [n] int32/int64 tokens each sequence attends to, >= 1
    All on one device; q, keys, values and out float32, bfloat16 or float16 (out in q's dtype).
    scale: None is SDPA's default, dim ** -0.5.
    tile_size: positions per tile, a power of two >= 16 (default ``tile``; the tests make it small, so that
    short sequences span several tiles).
    """
    n, heads, dim = q.shape
    kv_heads = keys.shape[1]
    if n == 0:
        return
    group = heads // kv_heads
    _decode[(n, kv_heads)](
        q, keys, values, tables, lengths, out, dim ** -0.5 if scale is None else float(scale), block_size, group, dim,
        *q.stride(), *keys.stride(), *values.stride(), *tables.stride(), lengths.stride(0), *out.stride(),
        TILE=tile_size or tile(group, dim), BLOCK_G=triton.next_power_of_2(group),
        BLOCK_D=triton.next_power_of_2(dim))


@triton.jit
def _decode(q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, out_ptr, scale, block_size, G, D,
            sq_n, sq_h, sq_d, sk_s, sk_h, sk_d, sv_s, sv_h, sv_d, st_n, st_b, sl_n, so_n, so_h, so_d,
            TILE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, TILE)
    heads = kvh * G + offs_g  # this kv head's query heads, repeat_kv order
    gmask = offs_g < G
    dmask = offs_d < D
    qd_mask = gmask[:, None] & dmask[None, :]
    q = tl.load(q_ptr + i * sq_n + heads[:, None] * sq_h + offs_d[None, :] * sq_d, mask=qd_mask,
                other=0.0).to(tl.float32)  # [G, D]
    length = tl.load(lengths_ptr + i * sl_n)
    top = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max of the scores
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running sum of exp(score - top)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)  # running sum of exp(score - top) * v
    for start in range(0, length, TILE):
        pos = start + offs_t
        live = pos < length  # [TILE]: positions the sequence holds
        blocks = tl.load(tables_ptr + i * st_n + (pos // block_size) * st_b, mask=live, other=0).to(tl.int64)
        slots = blocks * block_size + pos % block_size
        kd_mask = live[:, None] & dmask[None, :]
        k = tl.load(k_ptr + slots[:, None] * sk_s + kvh * sk_h + offs_d[None, :] * sk_d, mask=kd_mask,
                    other=0.0).to(tl.float32)  # [TILE, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, TILE]
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_top = tl.maximum(top, tl.max(scores, axis=1))  # finite: every tile has a live position
        rescale = tl.exp(top - new_top)  # 0 on the first block (top = -inf)
        p = tl.exp(scores - new_top[:, None])  # [G, TILE], 0 at dead positions
        v = tl.load(v_ptr + slots[:, None] * sv_s + kvh * sv_h + offs_d[None, :] * sv_d, mask=kd_mask,
                    other=0.0).to(tl.float32)  # [TILE, D]
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        top = new_top
    o = acc / total[:, None]
    tl.store(out_ptr + i * so_n + heads[:, None] * so_h + offs_d[None, :] * so_d,
             o.to(out_ptr.dtype.element_ty), mask=qd_mask)
