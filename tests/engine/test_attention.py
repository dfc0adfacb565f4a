"""Paged attention: the compiled CPU decode kernel against the reference (gather + SDPA) on a random pool with
sequences of every length, shared and scattered blocks, and a non-finite sequence that must stay its own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine import attention_kernels
from server.engine.attention import AttentionMetadata, PagedAttention
from server.engine.kv_cache import PagedKVCache
from server.engine.step_input import _decode_batch, _decode_groups

pytestmark = pytest.mark.skipif(not attention_kernels.available(), reason="numba is not installed")
BS, HEADS, KV_HEADS, DIM = 4, 6, 2, 8


class Seq:
    """What the planners read off a request: its blocks and computed tokens."""

    def __init__(self, block_ids, computed):
        self.block_ids, self.num_computed_tokens = block_ids, computed


def pool(gen) -> PagedKVCache:
    kv = PagedKVCache(1, 40, BS, KV_HEADS, DIM, torch.float32, torch.device("cpu"))
    kv.keys[0][BS:] = torch.randn(39 * BS, KV_HEADS, DIM, generator=gen)
    kv.values[0][BS:] = torch.randn(39 * BS, KV_HEADS, DIM, generator=gen)
    return kv


def both(kv, seqs, q):
    """(kernel, reference) decode outputs [n, heads, dim] for query q [heads, n, dim]."""
    decodes = [(s, 1) for s in seqs]
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), _decode_batch(decodes),
                             _decode_groups(decodes, BS, "cpu"))
    out = {}
    for kernel in (True, False):
        attn = PagedAttention(kv, "numba" if kernel else "torch")
        attn.meta = meta
        o = torch.empty(len(seqs), HEADS, DIM)
        if kernel:
            d = meta.decode
            attention_kernels.paged_decode(q.transpose(0, 1).contiguous(), kv.keys[0], kv.values[0], d.tables,
                                           d.lengths, BS, 0.3, o)
        else:
            for g in meta.decode_groups:
                o[g.lo:g.hi] = attn._decode(0, q[:, g.lo:g.hi], g, 0.3)
        out[kernel] = o
    return out[True], out[False]


def test_kernel_equals_the_reference_for_every_length_and_layout():
    gen = torch.Generator().manual_seed(0)
    kv = pool(gen)
    rng = np.random.default_rng(0)
    seqs = []
    for length in (1, 2, 3, 4, 5, 8, 9, 17, 30, 61):  # whole and partial last blocks
        blocks = rng.choice(np.arange(1, 40), size=-(-length // BS), replace=False).tolist()
        seqs.append(Seq(blocks, length - 1))
    seqs.append(Seq(seqs[-1].block_ids[:3], 10))  # a prefix shared with another sequence
    q = torch.randn(HEADS, len(seqs), DIM, generator=gen)
    got, want = both(kv, sorted(seqs, key=lambda s: -s.num_computed_tokens), q)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_a_non_finite_sequence_stays_its_own():
    gen = torch.Generator().manual_seed(1)
    kv = pool(gen)
    seqs = [Seq([1, 2, 3], 10), Seq([4, 5], 6), Seq([6], 3)]
    kv.keys[0][4 * BS + 1, 0, 0] = float("nan")  # inside sequence 1's first block
    kv.values[0][5 * BS, 1, 2] = float("inf")
    q = torch.randn(HEADS, 3, DIM, generator=gen)
    got, want = both(kv, seqs, q)
    assert not torch.isfinite(got[1]).all()
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=2e-6, rtol=1e-5)
    assert torch.isfinite(got[[0, 2]]).all()
