"""Triton LoRA kernels: shrink (h = x A^T) and expand (y += scale * h B) over a step's routes, Punica-style.

Semantics are ops.lora_segments': for every route entry e = (token t, slot s, scale c),
    y[t] += c * (x[t] @ A[s, :r].T) @ B[s, :r]
with r the largest live rank among the step's slots in the layer (rows past a slot's own rank are zero, as
the SlotBank keeps them, so they add exactly 0). Two shapes of the same math:

    decode (BGMV)   every slot has a few entries: one program per entry for the shrink (a vector-matrix
                    product), one per token for the expand, which walks that token's entries in order, so a
                    mixture's components add up without atomics and in a fixed order
    prefill (SGMV)  runs of entries per slot, cut into tiles of BLOCK_M entries: each tile is one tl.dot
                    against the slot's A (shrink) or B (expand), so a slot's weights are read once per tile.
                    A token appears at most once in each *pass* (pass k holds every token's k-th entry), so
                    the expand is one launch per pass and no two programs write one row at once

Shrink outputs stay in float32 (``h``: [members, entries, BLOCK_R]); every product accumulates in float32;
float32 operands multiply in IEEE precision (no TF32), float16/bfloat16 ones on the tensor cores. ``members``
> 1 is the fused shrink of same-input layers stacked in one SlotBank (k/v, gate/up): one launch reads x once.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported): how
the tests check them against the reference op on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from server.layers.transfer import to_device

BLOCK_M = 16  # entries per SGMV tile (tl.dot needs >= 16)
BLOCK_K = 32  # input features per shrink iteration
BLOCK_N = 64  # output features per expand program
# a step whose runs are all at most this long takes the BGMV kernels (no tile padding); untuned: no GPU has run
# these kernels yet (bench/gpu.sh measures them)
DECODE_MAX_RUN = 4


def usable(device: torch.device) -> bool:
    """Triton runs the kernels on CUDA devices, and on CPU tensors only under its interpreter (the tests)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True)
class TritonPlan:
    """A step's routes laid out for the kernels, built once per step on the device (every layer reads it).

    tok, slot, weight:  [E] the entries (int64, int64, float32), in token order (decode: each token's entries
                        contiguous, in their route order) or in (pass, slot, token) order (prefill)
    slots:              the distinct slots (numpy), for a layer's live rank this step
    decode:             BGMV (True) or SGMV (False)
    rows, ptr:          decode: [T] the tokens with entries, [T + 1] where each one's entries start in ``tok``
    tiles:              prefill: [3, num_tiles] int64 (slot, first entry, end of its run) of every tile
    passes:             prefill: ((first tile, end tile), ...) one per pass, launched in order
    """

    tok: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor
    slots: np.ndarray
    decode: bool
    rows: torch.Tensor | None = None
    ptr: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    passes: tuple[tuple[int, int], ...] = ()

    @property
    def num_entries(self) -> int:
        return self.tok.shape[0]

    @classmethod
    def build(cls, routes, device: torch.device, decode_max_run: int | None = None) -> "TritonPlan":
        """BGMV when no slot has more than ``decode_max_run`` entries (default DECODE_MAX_RUN), else SGMV."""
        tok, slot, scale = routes.tok, routes.slot, routes.scale
        decode_max_run = DECODE_MAX_RUN if decode_max_run is None else decode_max_run
        counts = np.bincount(slot)
        nth = _nth_of_token(tok)  # each entry's position among its token's entries: its pass
        if counts.max() <= decode_max_run:
            by = np.lexsort((nth, tok))  # token, then route order
            rows, starts = np.unique(tok[by], return_index=True)
            ints, weight = _to_device(device, [tok[by], slot[by], rows, np.append(starts, len(by))], scale[by])
            return cls(ints[0], ints[1], weight, np.unique(slot), True, rows=ints[2], ptr=ints[3])
        by = np.lexsort((tok, slot, nth))  # pass, slot, token
        tok, slot, nth = tok[by], slot[by], nth[by]
        head = np.ones(len(by), dtype=bool)
        head[1:] = (slot[1:] != slot[:-1]) | (nth[1:] != nth[:-1])
        run_start = np.flatnonzero(head)
        run_end = np.append(run_start[1:], len(by))
        tiles, passes, done = [], [], 0
        for p in range(int(nth.max()) + 1):
            for lo, hi in zip(run_start, run_end):
                if nth[lo] == p:
                    tiles.extend((slot[lo], first, hi) for first in range(lo, hi, BLOCK_M))
            passes.append((done, len(tiles)))
            done = len(tiles)
        tiles = np.asarray(tiles, dtype=np.int64).reshape(-1, 3).T
        ints, weight = _to_device(device, [tok, slot, tiles.reshape(-1)], scale[by])
        return cls(ints[0], ints[1], weight, np.unique(slot), False, tiles=ints[2].view(3, -1),
                   passes=tuple(passes))


def _nth_of_token(tok: np.ndarray) -> np.ndarray:
    """[E]: 0 for a token's first entry in route order, 1 for its second, ..."""
    order = np.argsort(tok, kind="stable")
    sorted_tok = tok[order]
    first = np.searchsorted(sorted_tok, sorted_tok, side="left")
    nth = np.empty(len(tok), dtype=np.int64)
    nth[order] = np.arange(len(tok)) - first
    return nth


def _to_device(device, ints: list[np.ndarray], weight: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The plan's int64 arrays as views of one device tensor, and the float32 weights: two copies a step."""
    sizes = [len(a) for a in ints]
    flat = to_device(torch.from_numpy(np.concatenate(ints).astype(np.int64)), device)
    return list(flat.split(sizes)), to_device(torch.from_numpy(weight.astype(np.float32)), device)


def _dot32(dtype: torch.dtype) -> bool:
    """Whether a tile product runs on float32 operands: for float32 weights (IEEE, no TF32), and for bfloat16
    under the interpreter, whose tl.dot gets bfloat16 operands wrong (triton 3.9: numpy has no bfloat16; float16
    is right), so the interpreted tests check the same math with the operands widened exactly."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def shrink(x: torch.Tensor, lora_a: torch.Tensor, plan: TritonPlan, rank: int) -> torch.Tensor:
    """h[m, e] = x[tok[e]] @ lora_a[m, slot[e], :rank].T for every member m, float32.

    x: [num_tokens, in]   lora_a: [members, num_slots, max_rank, in]   returns h: [members, E, block_r(rank)]
    """
    members, _, _, k = lora_a.shape
    br = block_r(rank)
    h = torch.empty(members, plan.num_entries, br, dtype=torch.float32, device=x.device)
    fp32 = _dot32(lora_a.dtype)
    strides = (*x.stride(), *lora_a.stride()[:3], lora_a.stride(3), *h.stride())
    if plan.decode:
        _shrink_bgmv[(plan.num_entries, members)](x, lora_a, h, plan.tok, plan.slot, k, rank, *strides,
                                                  BLOCK_R=br, BLOCK_K=BLOCK_K)
    else:
        tiles = plan.tiles
        _shrink_sgmv[(tiles.shape[1], members)](x, lora_a, h, plan.tok, tiles[0], tiles[1], tiles[2], k, rank,
                                                *strides, BLOCK_M=BLOCK_M, BLOCK_R=br, BLOCK_K=BLOCK_K, FP32=fp32)
    return h


def expand(y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, plan: TritonPlan, rank: int) -> None:
    """y[tok[e]] += weight[e] * h[e, :rank] @ lora_b[slot[e], :rank], in place, for every entry.

    y: [num_tokens, out]   h: [E, BLOCK_R] float32 (one member of shrink's output)   lora_b: [num_slots, max_rank, out]
    """
    n = lora_b.shape[2]
    br = h.shape[1]
    strides = (*y.stride(), *h.stride(), *lora_b.stride())
    grid_n = triton.cdiv(n, BLOCK_N)
    if plan.decode:
        _expand_bgmv[(plan.rows.shape[0], grid_n)](y, h, lora_b, plan.rows, plan.ptr, plan.slot, plan.weight, n,
                                                   rank, *strides, BLOCK_R=br, BLOCK_N=BLOCK_N)
        return
    # a mixture's later passes would round a 16-bit y once per pass, at the partial sums' magnitude: they add
    # into a float32 copy instead, rounded once, as the decode kernel does
    out = y.float() if len(plan.passes) > 1 and y.dtype != torch.float32 else y
    strides = (*out.stride(), *h.stride(), *lora_b.stride())
    fp32 = _dot32(lora_b.dtype)
    tiles = plan.tiles
    for lo, hi in plan.passes:  # in order: a token's k-th entry adds after its (k-1)-th
        if hi > lo:
            _expand_sgmv[(hi - lo, grid_n)](out, h, lora_b, plan.tok, plan.weight, tiles[0, lo:hi],
                                            tiles[1, lo:hi], tiles[2, lo:hi], n, rank, *strides, BLOCK_M=BLOCK_M,
                                            BLOCK_R=br, BLOCK_N=BLOCK_N, FP32=fp32)
    if out is not y:
        y.copy_(out)


@triton.jit
def _shrink_bgmv(x_ptr, a_ptr, h_ptr, tok_ptr, slot_ptr, K, R,
                 sx_t, sx_k, sa_m, sa_s, sa_r, sa_k, sh_m, sh_e, sh_r,
                 BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    m = tl.program_id(1)
    tok = tl.load(tok_ptr + e)
    slot = tl.load(slot_ptr + e)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + m * sa_m + slot * sa_s + offs_r[:, None] * sa_r
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xv = tl.load(x_ptr + tok * sx_t + kk * sx_k, mask=kk < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        a = tl.load(a_rows + kk[None, :] * sa_k, mask=(offs_r[:, None] < R) & (kk[None, :] < K), other=0.0)
        acc += tl.sum(a.to(tl.float32) * xv[None, :], axis=1)
    tl.store(h_ptr + m * sh_m + e * sh_e + offs_r * sh_r, acc)


@triton.jit
def _expand_bgmv(y_ptr, h_ptr, b_ptr, rows_ptr, ptr_ptr, slot_ptr, weight_ptr, N, R,
                 sy_t, sy_n, sh_e, sh_r, sb_s, sb_r, sb_n,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    tok = tl.load(rows_ptr + i)
    first = tl.load(ptr_ptr + i)
    end = tl.load(ptr_ptr + i + 1)
    bmask = (offs_r[:, None] < R) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for e in range(first, end):  # this token's entries, in route order
        slot = tl.load(slot_ptr + e)
        w = tl.load(weight_ptr + e)
        hv = tl.load(h_ptr + e * sh_e + offs_r * sh_r)  # [BLOCK_R] float32
        b = tl.load(b_ptr + slot * sb_s + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n, mask=bmask, other=0.0)
        acc += w * tl.sum(hv[:, None] * b.to(tl.float32), axis=0)
    out = y_ptr + tok * sy_t + offs_n * sy_n
    nmask = offs_n < N
    y = tl.load(out, mask=nmask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _shrink_sgmv(x_ptr, a_ptr, h_ptr, tok_ptr, tile_slot, tile_first, tile_end, K, R,
                 sx_t, sx_k, sa_m, sa_s, sa_r, sa_k, sh_m, sh_e, sh_r,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FP32: tl.constexpr):
    t = tl.program_id(0)
    m = tl.program_id(1)
    slot = tl.load(tile_slot + t)
    offs_e = tl.load(tile_first + t) + tl.arange(0, BLOCK_M)
    emask = offs_e < tl.load(tile_end + t)
    tok = tl.load(tok_ptr + offs_e, mask=emask, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + m * sa_m + slot * sa_s
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        xt = tl.load(x_ptr + tok[:, None] * sx_t + kk[None, :] * sx_k, mask=emask[:, None] & (kk[None, :] < K),
                     other=0.0)  # [BLOCK_M, BLOCK_K]
        at = tl.load(a_base + offs_r[None, :] * sa_r + kk[:, None] * sa_k,
                     mask=(kk[:, None] < K) & (offs_r[None, :] < R), other=0.0)  # [BLOCK_K, BLOCK_R]: A^T
        if FP32:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt.to(a_ptr.dtype.element_ty), at)
    tl.store(h_ptr + m * sh_m + offs_e[:, None] * sh_e + offs_r[None, :] * sh_r, acc, mask=emask[:, None])


@triton.jit
def _expand_sgmv(y_ptr, h_ptr, b_ptr, tok_ptr, weight_ptr, tile_slot, tile_first, tile_end, N, R,
                 sy_t, sy_n, sh_e, sh_r, sb_s, sb_r, sb_n,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, FP32: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.load(tile_slot + t)
    offs_e = tl.load(tile_first + t) + tl.arange(0, BLOCK_M)
    emask = offs_e < tl.load(tile_end + t)
    tok = tl.load(tok_ptr + offs_e, mask=emask, other=0)
    w = tl.load(weight_ptr + offs_e, mask=emask, other=0.0)
    offs_r = tl.arange(0, BLOCK_R)
    hv = tl.load(h_ptr + offs_e[:, None] * sh_e + offs_r[None, :] * sh_r, mask=emask[:, None], other=0.0)
    b = tl.load(b_ptr + slot * sb_s + offs_r[:, None] * sb_r + offs_n[None, :] * sb_n,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)  # [BLOCK_R, BLOCK_N]
    if FP32:
        d = tl.dot(hv, b.to(tl.float32), input_precision="ieee")
    else:
        d = tl.dot(hv.to(b_ptr.dtype.element_ty), b)
    d = d * w[:, None]
    out = y_ptr + tok[:, None] * sy_t + offs_n[None, :] * sy_n
    omask = emask[:, None] & (offs_n[None, :] < N)
    y = tl.load(out, mask=omask, other=0.0)
    tl.store(out, (y.to(tl.float32) + d).to(y_ptr.dtype.element_ty), mask=omask)
