"""The Triton LoRA kernels (server/layers/lora_triton.py) and the TritonLora backend against the reference op.

Without a GPU they run under Triton's interpreter (tests/support.py sets TRITON_INTERPRET=1), which executes
every program instance in Python: the shapes stay small. Each case is random: ranks 1-64, 1-64 slots (some of
them empty, some at rank 0 in the layer), ragged runs, and mixtures (several entries per token, negative and
fractional scales), on both kernel shapes (BGMV for decode, SGMV for prefill).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from server.layers import lora_triton  # noqa: E402  (after the skip: triton may be missing)
from server.layers.adapter_linear import AdapterLinear  # noqa: E402
from server.layers.host_weights import ModuleWeights  # noqa: E402
from server.layers.lora_backend import TorchLora, TritonLora, choose  # noqa: E402
from server.layers.mapping import AdapterMapping, MappingHolder, Routes  # noqa: E402
from server.layers.ops import lora_segments  # noqa: E402
from server.layers.slot_bank import SlotBank  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_case(seed: int, dtype: torch.dtype):
    """(x, A [1, S, R, in], B [S, R, out], ranks, routes, y0): rows past each slot's rank are zero, as the slots
    keep them; magnitudes near 1 so 16-bit tolerances mean what they say."""
    g = np.random.default_rng(seed)
    slots = int(g.choice([1, 3, 17, 64]))
    max_rank = int(g.choice([1, 4, 16, 64]))
    inp, out, tokens = int(g.integers(8, 72)), int(g.integers(8, 80)), int(g.integers(1, 40))
    ranks = g.integers(0, max_rank + 1, slots)
    ranks[g.integers(0, slots)] = max_rank
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(1, slots, max_rank, inp, generator=gen) / inp ** 0.5
    b = torch.randn(slots, max_rank, out, generator=gen) / max_rank ** 0.5
    for s, r in enumerate(ranks):
        a[0, s, r:] = 0
        b[s, r:] = 0
    used = g.choice(slots, size=min(slots, int(g.integers(1, 9))), replace=False)  # the others stay empty
    entries = []
    for t in range(tokens):
        if g.random() < 0.2:
            continue  # a base row
        k = min(len(used), int(g.choice([1, 1, 2, 3])))  # a plain adapter or a mixture
        for s in g.choice(used, size=k, replace=False):
            entries.append((t, int(s), float(g.choice([1.0, 0.5, -0.75, 2.0]))))
    if not entries:
        entries.append((0, int(used[0]), 1.0))
    if g.random() < 0.5:  # a ragged prefill: one long run on one slot
        entries += [(t, int(used[0]), 1.0) for t in range(tokens) if all(e[0] != t for e in entries)]
    tok, slot, scale = (np.array(c) for c in zip(*entries))
    routes = Routes(tok.astype(np.int64), slot.astype(np.int64), scale.astype(np.float64), tokens)
    x = torch.randn(tokens, inp, generator=gen)
    y0 = 0.1 * torch.randn(tokens, out, generator=gen)
    cast = dict(dtype=dtype, device=DEVICE)
    return x.to(**cast), a.to(**cast), b.to(**cast), ranks, routes, y0.to(**cast)


def reference(x, a, b, ranks, routes, y0):
    """The reference op on the same (possibly 16-bit) values in float32: the kernels accumulate in float32."""
    y = y0.float().cpu().clone()
    lora_segments(y, x.float().cpu(), a[0].float().cpu(), b.float().cpu(), list(ranks),
                  AdapterMapping.route(routes, a.shape[1]).segments)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decode", [True, False], ids=["bgmv", "sgmv"])
def test_kernels_equal_the_reference_op(seed, dtype, decode):
    x, a, b, ranks, routes, y0 = random_case(seed, dtype)
    plan = lora_triton.TritonPlan.build(routes, DEVICE, decode_max_run=10 ** 6 if decode else 0)
    assert plan.decode == decode
    rank = int(ranks[plan.slots].max())
    y = y0.clone()
    if rank:
        lora_triton.expand(y, lora_triton.shrink(x, a, plan, rank)[0], b, plan, rank)
    torch.testing.assert_close(y.float().cpu(), reference(x, a, b, ranks, routes, y0), atol=TOL[dtype],
                               rtol=TOL[dtype])


def test_a_mixture_adds_in_route_order_on_both_shapes():
    """Several entries per token on one slot pair, both kernel shapes: the same sums (the SGMV expand is one
    launch per pass, the BGMV one walks each token's entries)."""
    x, a, b, ranks, _, y0 = random_case(7, torch.float32)
    ranks[:] = a.shape[2]
    tokens = x.shape[0]
    tok = np.repeat(np.arange(tokens), 2)
    slot = np.tile([0, a.shape[1] - 1], tokens)
    routes = Routes(tok, slot, np.tile([0.5, -1.5], tokens), tokens)
    want = reference(x, a, b, ranks, routes, y0)
    for decode in (True, False):
        plan = lora_triton.TritonPlan.build(routes, DEVICE, decode_max_run=10 ** 6 if decode else 0)
        y = y0.clone()
        lora_triton.expand(y, lora_triton.shrink(x, a, plan, a.shape[2])[0], b, plan, a.shape[2])
        torch.testing.assert_close(y.cpu(), want, atol=1e-5, rtol=1e-5)


def attention_block(holder, dtype):
    """q, k, v projections of one parent module stacked in one SlotBank (as in a model without GQA), slot 1
    holding a rank-4 adapter on all three and slot 2 one on k only."""
    bank = SlotBank(3, 24, 24, False, 3, 8, dtype, DEVICE)
    gen = torch.Generator().manual_seed(3)
    layers = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        base = nn.Linear(24, 24, bias=False).to(dtype=dtype, device=DEVICE).requires_grad_(False)
        base.weight.copy_(torch.randn(24, 24, generator=gen))
        layers[name] = AdapterLinear(base, holder, 3, 8, dtype, DEVICE, bank=bank)
        bank.paths.append(f"model.layers.0.self_attn.{name}")
    modules = {1: {}, 2: {}}  # slot -> member -> its adapter tensors (A [r, in], slot-ready B [r, out])
    for name in layers:
        for slot, rank in ((1, 4), (2, 6 if name == "k_proj" else 0)):
            if rank:
                modules[slot][name] = ModuleWeights(a=torch.randn(rank, 24, generator=gen).to(dtype),
                                                    slot_b=torch.randn(rank, 24, generator=gen).to(dtype))
    for slot, members in modules.items():
        bank.fill_layers(slot, [members.get(name) for name in layers])
    return layers


@pytest.mark.parametrize("decode_max_run", [lora_triton.DECODE_MAX_RUN, 0], ids=["bgmv", "sgmv"])
def test_same_input_layers_share_one_shrink_and_equal_the_reference(decode_max_run, monkeypatch):
    """k/v/q in one bank: the first call's fused shrink serves the others only for the very same input; a
    different input (o_proj-like) gets its own shrink, so results equal the reference op either way."""
    monkeypatch.setattr(lora_triton, "DECODE_MAX_RUN", decode_max_run)
    routes = Routes(np.array([0, 1, 1, 2, 3]), np.array([1, 1, 2, 2, 1]), np.array([1.0, 0.5, -1.0, 1.0, 2.0]), 5)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    other = x.flip(0).contiguous()
    results = {}
    for backend in (TorchLora(), TritonLora()):
        holder = MappingHolder(backend)
        layers = attention_block(holder, torch.float32)
        holder.mapping = backend.plan(routes, 3, DEVICE)
        shrinks = []
        real = lora_triton.shrink
        monkeypatch.setattr(lora_triton, "shrink", lambda *a, **k: shrinks.append(a[1].shape[0]) or real(*a, **k))
        results[backend.name] = [layers["q_proj"](x), layers["k_proj"](x), layers["v_proj"](other)]
        monkeypatch.setattr(lora_triton, "shrink", real)
        if backend.name == "triton":
            assert shrinks == [3, 3]  # q's call for all three; v's input differs, so it ran its own
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_backend_choice(monkeypatch):
    """--lora-kernel triton on a CPU runs only under the interpreter; auto never takes it on a CPU."""
    cpu = torch.device("cpu")
    assert choose("auto", "auto", cpu, torch.bfloat16, 1, 2).name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose("triton", "auto", cpu, torch.bfloat16, 1, 2).name == "triton"
    with pytest.raises(ValueError, match="--lora-overlap on needs"):
        choose("triton", "on", cpu, torch.float32, 1, 2)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="--lora-kernel triton needs a CUDA device"):
        choose("triton", "auto", cpu, torch.float32, 1, 2)
