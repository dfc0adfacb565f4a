"""The Triton paged decode kernel (server/engine/attention_triton.py) against the reference, and the engine served
with --attention-kernel triton against --attention-kernel torch and PEFT.

Without a GPU it runs under Triton's interpreter (tests/support.py sets TRITON_INTERPRET=1), which executes every
program in Python: the shapes stay small. Each kernel case is random: GQA ratios 1, 3 and 4, lengths 1 to ~5
blocks with block boundaries on both sides, sequences of very different lengths in one launch, scattered and
shared blocks, tables wider than any sequence needs, and the null block filled with NaN so that reading it
(or anything past a sequence's length) poisons the result.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from server.engine import attention_kernels  # noqa: E402
from server.engine import attention_triton  # noqa: E402  (after the skip: triton may be missing)
from server.config import EngineConfig  # noqa: E402
from server.engine.attention import AttentionMetadata, PagedAttention, attention_kernel_choice  # noqa: E402
from server.engine.kv_cache import PagedKVCache  # noqa: E402
from server.engine.step_input import _decode_batch, _decode_groups  # noqa: E402
from server.engine.engine import LLMEngine  # noqa: E402
from .helpers import config, drain, step, submit  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NUM_BLOCKS = 48


def reference(q, keys, values, tables, lengths, block_size, scale):
    """Per sequence, plain SDPA over exactly its own keys (gathered in float32): [n, heads, dim]."""
    out = []
    for i, length in enumerate(lengths.tolist()):
        pos = torch.arange(length)
        slots = tables[i].long().cpu()[pos // block_size] * block_size + pos % block_size
        k = keys.float().cpu()[slots].transpose(0, 1)[None]  # [1, kvh, L, d]
        v = values.float().cpu()[slots].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(q[i].float().cpu()[None, :, None], k, v, scale=scale, enable_gqa=True)
        out.append(o[0, :, 0])
    return torch.stack(out)


def random_case(seed: int, dtype: torch.dtype, group: int, block_size: int, dim: int):
    """(q, keys, values, tables, lengths): 5 sequences, lengths drawn around block boundaries plus a length 1,
    each sequence's blocks a random draw (two share a prefix), tables padded with 0 past their blocks and
    wider than the longest needs, the null block NaN."""
    g = np.random.default_rng(seed)
    kv_heads = 2 - seed % 2  # float32 and float16 cases with 2 kv heads: GQA's head order matters
    heads = group * kv_heads
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(NUM_BLOCKS * block_size, kv_heads, dim, generator=gen)
    values = torch.randn(NUM_BLOCKS * block_size, kv_heads, dim, generator=gen)
    keys[:block_size] = values[:block_size] = float("nan")  # the null block: never to be read
    edges = [block_size - 1, block_size, block_size + 1, 2 * block_size, 3 * block_size + 1]
    lengths = [1] + [int(g.choice(edges)) for _ in range(2)] + [int(g.integers(2, 5 * block_size))] * 2
    width = -(-max(lengths) // block_size) + 2
    tables = np.zeros((len(lengths), width), dtype=np.int64)
    for i, length in enumerate(lengths):
        need = -(-length // block_size)
        tables[i, :need] = g.choice(np.arange(1, NUM_BLOCKS), size=need, replace=False)
    tables[-1, :2] = tables[-2, :2]  # a prefix shared with another sequence
    q = torch.randn(len(lengths), heads, dim, generator=gen)
    index_dtype = torch.int32 if seed // 10 % 2 else torch.int64
    cast = dict(dtype=dtype, device=DEVICE)
    return (q.to(**cast), keys.to(**cast), values.to(**cast), torch.from_numpy(tables).to(DEVICE, index_dtype),
            torch.tensor(lengths, device=DEVICE, dtype=index_dtype))


CASES = [  # (group, block_size, dim, tile): GQA ratios 1, 3, 4; power-of-two blocks and one that is not; odd
    # dims; tiles of 16 positions (a sequence spans up to 5 of them: the online softmax's rescaling) and the
    # default (most sequences in one tile)
    (1, 4, 8, 16), (3, 4, 16, None), (4, 8, 8, 16), (3, 16, 12, 16), (1, 16, 64, None), (4, 6, 16, 16),
    (3, 32, 8, 16),
]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group,block_size,dim,tile", CASES)
def test_kernel_equals_per_sequence_sdpa(dtype, group, block_size, dim, tile):
    seed = 10 * CASES.index((group, block_size, dim, tile)) + DTYPES.index(dtype)
    q, keys, values, tables, lengths = random_case(seed, dtype, group, block_size, dim)
    out = torch.full_like(q, float("nan"))
    attention_triton.paged_decode(q, keys, values, tables, lengths, block_size, dim ** -0.5, out, tile)
    want = reference(q, keys, values, tables, lengths, block_size, dim ** -0.5)
    assert out.dtype == dtype and torch.isfinite(out).all(), "the null block or a row past a length was read"
    torch.testing.assert_close(out.float().cpu(), want, atol=TOL[dtype], rtol=TOL[dtype])


def test_kernel_writes_strided_views_and_no_other_row():
    """q as the transposed [heads, T, d] slice the attention layer passes, out as rows of the step's output:
    the rows around the decodes stay untouched."""
    q, keys, values, tables, lengths = random_case(7, torch.float32, 3, 4, 8)
    n, heads, dim = q.shape
    flat_q = torch.randn(heads, n + 2, dim, device=DEVICE)
    flat_q[:, 1:n + 1] = q.transpose(0, 1)
    out = torch.zeros(n + 2, heads, dim, device=DEVICE)
    attention_triton.paged_decode(flat_q[:, 1:n + 1].transpose(0, 1), keys, values, tables, lengths, 4, 0.3,
                                  out[1:n + 1])
    torch.testing.assert_close(out[1:n + 1].cpu(), reference(q, keys, values, tables, lengths, 4, 0.3),
                               atol=1e-5, rtol=1e-5)
    assert not out[0].any() and not out[-1].any()


def test_a_non_finite_sequence_stays_its_own():
    """A NaN key and an infinite value in one sequence's blocks (a poisoned adapter's own KV) make that
    sequence's row non-finite and no other."""
    q, keys, values, tables, lengths = random_case(5, torch.float32, 3, 4, 8)
    others = set(tables[[0, 1, 3, 4], :2].flatten().tolist())
    assert lengths[2] > 9 and not set(tables[2, :3].tolist()) & others  # the poisoned block is sequence 2's alone
    keys[int(tables[1, 0]) * 4, 0, 0] = float("nan")  # sequence 1's first position
    values[int(tables[2, 2]) * 4 + 1, 0, 2] = float("inf")  # inside sequence 2's third block, its own
    out = torch.empty_like(q)
    attention_triton.paged_decode(q, keys, values, tables, lengths, 4, 0.3, out, 16)
    want = reference(q, keys, values, tables, lengths, 4, 0.3)
    rest = [0, 3, 4]
    assert not torch.isfinite(out[1]).all() and not torch.isfinite(out[2]).all()
    assert torch.isfinite(out[rest]).all()
    torch.testing.assert_close(out[rest].cpu(), want[rest], atol=1e-5, rtol=1e-5)


class Seq:
    """What the planners read off a request: its blocks and computed tokens."""

    def __init__(self, block_ids, computed):
        self.block_ids, self.num_computed_tokens = block_ids, computed


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_forward_equals_the_torch_path(kv_heads):
    """PagedAttention.forward on a decode step (each sequence writes its new key and value, then attends over
    its cache): the triton path, fed the step's device tables, equals the reference gather + SDPA path."""
    block_size, heads, dim = 4, 3 * kv_heads, 8
    gen = torch.Generator().manual_seed(kv_heads)
    seqs = [Seq([5, 2, 9], 9), Seq([7], 0), Seq([3, 4], 4), Seq([1, 6, 8, 10, 11], 17)]
    seqs.sort(key=lambda s: -s.num_computed_tokens)  # StepInput's order: longest first
    decodes = [(s, 1) for s in seqs]
    slots = torch.tensor([s.block_ids[s.num_computed_tokens // block_size] * block_size
                          + s.num_computed_tokens % block_size for s in seqs], device=DEVICE)
    meta = AttentionMetadata(slots, _decode_batch(decodes, DEVICE), _decode_groups(decodes, block_size, DEVICE))
    assert meta.decode.device_tables.dtype == torch.int32 and meta.decode.device_tables.device.type == DEVICE.type
    pools = torch.randn(2, 12 * block_size, kv_heads, dim, generator=gen)
    query = torch.randn(1, heads, len(seqs), dim, generator=gen).to(DEVICE)
    key, value = torch.randn(2, 1, kv_heads, len(seqs), dim, generator=gen).to(DEVICE)
    out = {}
    for path in ("triton", "torch"):
        kv = PagedKVCache(1, 12, block_size, kv_heads, dim, torch.float32, DEVICE)
        kv.keys[0][block_size:] = pools[0, block_size:].to(DEVICE)
        kv.values[0][block_size:] = pools[1, block_size:].to(DEVICE)
        attn = PagedAttention(kv, path)
        attn.meta = meta
        out[path] = attn.forward(0, query, key, value, 0.25)
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-5, rtol=1e-5)


def test_choice(monkeypatch, tiny_model_dir, root):
    """auto never takes triton on a CPU; --attention-kernel triton on a CPU runs only under the interpreter and
    is otherwise refused, by the engine at start, with a message naming what is missing."""
    cpu = torch.device("cpu")
    assert attention_kernel_choice("auto", cpu, torch.bfloat16) == "torch"
    assert attention_kernel_choice("auto", cpu, torch.float32) == (
        "numba" if attention_kernels.available() else "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention_kernel_choice("triton", cpu, torch.bfloat16) == "triton"
    assert attention_kernel_choice("auto", cpu, torch.bfloat16) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="--attention-kernel triton needs a CUDA device.*TRITON_INTERPRET"):
        attention_kernel_choice("triton", cpu, torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--attention-kernel triton needs a CUDA device"):
            LLMEngine(config(tiny_model_dir, root, attention_kernel="triton"))
    with pytest.raises(ValueError, match="--attention-kernel must be one of auto, numba, torch, triton"):
        EngineConfig(model="m", attention_kernel="flash")


def _served(fresh_llm, attention: str, prompts):
    """Greedy requests on an engine with ``attention``, mixed lengths decoding together, the last one arriving
    after the first step (its prefill shares a step with the others' decodes); the logits of every step,
    recorded from the runner."""
    eng = fresh_llm(attention_kernel=attention, block_size=8)
    assert eng.runner.attention.decode == attention
    logits, mixed = [], []
    execute = eng.runner.execute

    def recording(seqs, weights):
        out = execute(seqs, weights)
        logits.append(out.logits.clone())
        mixed.append(any(n == 1 for _, n in seqs) and any(n > 1 for _, n in seqs))
        return out

    eng.runner.execute = recording
    reqs = [submit(eng, prompt, adapter, max_tokens=max_tokens, logprobs=True)
            for prompt, adapter, max_tokens in prompts[:-1]]
    step(eng)
    prompt, adapter, max_tokens = prompts[-1]
    reqs.append(submit(eng, prompt, adapter, max_tokens=max_tokens, logprobs=True))
    drain(eng)
    assert all(r.finish_reason == "length" for r in reqs)
    assert any(mixed), "no step had decodes and a prefill together"
    return reqs, logits


def test_engine_with_triton_attention_equals_torch_and_peft(fresh_llm, oracle):
    """Four requests of very different lengths (1 to 38 prompt tokens, crossing 8-token blocks while they
    decode side by side, one with a LoRA, one finishing early, the longest arriving late): every step's logits
    within 1e-4 of the torch path's, the same greedy tokens, and PEFT's tokens and log-probabilities."""
    gen = torch.Generator().manual_seed(3)
    lengths, outputs = (1, 7, 15, 38), (5, 4, 5, 5)
    prompts = [(torch.randint(6, 300, (n,), generator=gen).tolist(), "lora" if n == 15 else None, m)
               for n, m in zip(lengths, outputs)]
    got, got_logits = _served(fresh_llm, "triton", prompts)
    want, want_logits = _served(fresh_llm, "torch", prompts)
    assert len(got_logits) == len(want_logits)
    for a, b in zip(got_logits, want_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    for g, w in zip(got, want):
        assert g.output_token_ids == w.output_token_ids
        peft_tokens, peft_lp = oracle.greedy(g.adapter, g.prompt_token_ids, g.params.max_tokens)
        assert g.output_token_ids == peft_tokens
        assert g.output_logprobs == pytest.approx(peft_lp, abs=1e-4)
