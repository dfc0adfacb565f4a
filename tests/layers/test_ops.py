"""The reference batched ops (server/layers/ops.py), AdapterMapping.build, and one AdapterLinear against PEFT.

Layer-level oracle: a toy module with one ``nn.Linear`` (with and without bias, which the tiny Llama lacks, so
DoRA's bias term is only covered here) wrapped by PEFT per adapter kind; our wrapper holds all kinds in slots
at once and must match PEFT row by row, while base rows stay bit-exact with the unwrapped layer.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from support import per_token, randomize_adapter
from server.adapters.formats import load_adapter_dir
from server.layers import kernels
from server.layers.adapter_linear import AdapterLinear
from server.layers.lora_backend import NumbaLora
from server.layers.mapping import NO_SLOT, AdapterMapping, MappingHolder, Routes
from server.layers.ops import lora_grouped, lora_segments, scale_rows, shift_rows

IN, OUT, SLOTS, MAX_RANK = 16, 12, 4, 8


def per_token_reference(y, x, a, b, ranks, token_slots):
    """The op's contract written as the obvious loop over tokens."""
    out = y.clone()
    for t, s in enumerate(token_slots):
        if s != NO_SLOT and ranks[s]:
            out[t] += (x[t] @ a[s, :ranks[s]].T) @ b[s, :ranks[s]]
    return out


def random_slots(ranks, gen):
    a = torch.randn(SLOTS, MAX_RANK, IN, generator=gen)
    b = torch.randn(SLOTS, MAX_RANK, OUT, generator=gen)
    for s, r in enumerate(ranks):  # rows past the live rank must never be read
        a[s, r:] = float("nan")
        b[s, r:] = float("nan")
    return a, b


# ---------------------------------------------------------------- AdapterMapping.build

def test_mapping_all_base_is_empty():
    m = AdapterMapping.build(per_token([NO_SLOT, NO_SLOT], 3), num_slots=SLOTS)
    assert m.empty and m.segments == () and m.scale_index is None and m.slots == frozenset()


@pytest.mark.parametrize("rows", [[2], [2, 2, 2]])
def test_mapping_single_slot_fast_path(rows):
    m = AdapterMapping.build(per_token(rows, 5), num_slots=SLOTS)
    assert m.segments == ((2, None, 1.0),)  # no gather: the op applies the slot to every token
    assert torch.equal(m.scale_index, torch.full((5 * len(rows),), 2, dtype=torch.long))
    assert m.slots == frozenset({2})


def test_mapping_mixed_segments_and_identity_row():
    rows, tpr = [1, NO_SLOT, 3, 1, NO_SLOT], 2
    m = AdapterMapping.build(per_token(rows, tpr), num_slots=SLOTS)
    token_slots = [s for s in rows for _ in range(tpr)]
    assert [s for s, *_ in m.segments] == [1, 3]  # one segment per distinct slot, sorted
    for slot, index, _ in m.segments:
        assert index.tolist() == [t for t, s in enumerate(token_slots) if s == slot]
    # base tokens read the identity row (index num_slots) of every scale table
    assert m.scale_index.tolist() == [SLOTS if s == NO_SLOT else s for s in token_slots]
    assert m.slots == frozenset({1, 3}) and not m.empty


def test_mapping_one_slot_plus_base_rows_is_not_fast_path():
    m = AdapterMapping.build(per_token([0, NO_SLOT], 3), num_slots=SLOTS)
    assert len(m.segments) == 1 and m.segments[0][0] == 0 and m.segments[0][1].tolist() == [0, 1, 2]
    assert m.scale_index.tolist() == [0, 0, 0, SLOTS, SLOTS, SLOTS]


# ---------------------------------------------------------------- ops

@pytest.mark.parametrize("rows", [[0, NO_SLOT, 2, 0, 1, NO_SLOT], [1, 1, 1], [3, NO_SLOT]])
def test_lora_segments_matches_per_token_loop(rows):
    gen = torch.Generator().manual_seed(0)
    ranks, tpr = [3, 0, 8, 1], 3  # slot 1 has rank 0: its adapter does not touch this layer
    a, b = random_slots(ranks, gen)
    x, y = torch.randn(len(rows) * tpr, IN, generator=gen), torch.randn(len(rows) * tpr, OUT, generator=gen)
    m = AdapterMapping.build(per_token(rows, tpr), SLOTS)
    token_slots = [s for s in rows for _ in range(tpr)]
    expect = per_token_reference(y, x, a, b, ranks, token_slots)
    got = y.clone()
    lora_segments(got, x, a, b, ranks, m.segments)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    untouched = [t for t, s in enumerate(token_slots) if s == NO_SLOT or ranks[s] == 0]
    assert torch.equal(got[untouched], y[untouched])  # base / rank-0 tokens: bit for bit


def test_scale_and_shift_identity_row_is_bit_exact():
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(6, OUT, generator=gen)
    scale = torch.cat([torch.randn(SLOTS, OUT, generator=gen), torch.ones(1, OUT)])
    shift = torch.cat([torch.randn(SLOTS, OUT, generator=gen), torch.zeros(1, OUT)])
    index = torch.tensor([SLOTS, 0, SLOTS, 3, 3, SLOTS])
    scaled, shifted = scale_rows(t, scale, index), shift_rows(t, shift, index)
    base = index == SLOTS
    assert torch.equal(scaled[base], t[base]) and torch.equal(shifted[base], t[base])
    assert torch.equal(scaled[~base], t[~base] * scale[index[~base]])
    assert torch.equal(shifted[~base], t[~base] + shift[index[~base]])


# ---------------------------------------------------------------- AdapterLinear vs PEFT on one layer

class Toy(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(IN, OUT, bias=bias)
        gen = torch.Generator().manual_seed(0)  # every Toy has the same base weights
        with torch.no_grad():
            self.proj.weight.copy_(0.3 * torch.randn(OUT, IN, generator=gen))
            if bias:
                self.proj.bias.copy_(0.5 * torch.randn(OUT, generator=gen))

    def forward(self, x):
        return self.proj(x)


def toy_config(kind: str):
    from peft import IA3Config, LoraConfig

    return {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]),
            "rslora": LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["proj"]),
            "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["proj"]),
            "ia3_out": IA3Config(target_modules=["proj"], feedforward_modules=[]),
            "ia3_in": IA3Config(target_modules=["proj"], feedforward_modules=["proj"])}[kind]


TOY_KINDS = ("lora", "dora", "ia3_out", "ia3_in")  # one per slot; rslora replaces lora in a second layout


@pytest.fixture(scope="module", params=[True, False], ids=["bias", "nobias"])
def toy(request, tmp_path_factory):
    """(bias, {kind: (peft model, ModuleWeights)}) for every toy kind."""
    from peft import get_peft_model

    out = {}
    for i, kind in enumerate(TOY_KINDS + ("rslora",)):
        pm = get_peft_model(Toy(request.param), toy_config(kind))
        randomize_adapter(pm, seed=10 + i, scale=0.3)
        path = tmp_path_factory.mktemp(f"toy-{kind}")
        pm.save_pretrained(path)
        out[kind] = (pm.eval(), load_adapter_dir(path, kind).modules["proj"])
    return request.param, out


def wrapped(bias: bool, slot_kinds, toy_adapters, max_run: int = 0, worker=None):
    """The toy layer wrapped, a kind per slot; ``max_run`` > 0: on the numba backend (with ``worker``)."""
    holder = MappingHolder(NumbaLora(max_run, worker) if max_run else None)
    layer = AdapterLinear(Toy(bias).proj, holder, SLOTS, MAX_RANK, torch.float32, torch.device("cpu"))
    for slot, kind in enumerate(slot_kinds):
        layer.bank.fill_layers(slot, [toy_adapters[kind][1]])
    return layer, holder


@pytest.mark.parametrize("max_run", [0, kernels.max_run(1)] if kernels.available() else [0], ids=["torch", "numba"][
    :1 + kernels.available()])
@pytest.mark.parametrize("slot_kinds", [TOY_KINDS, ("rslora", "ia3_in", "dora", "ia3_out")], ids=["a", "b"])
@pytest.mark.parametrize("rows", [[0, NO_SLOT, 1, 2, NO_SLOT, 3, 1], [2, 2], [1, 1, 1], [NO_SLOT, 3]])
def test_adapter_linear_mixed_rows_match_peft(toy, slot_kinds, rows, max_run):
    bias, adapters = toy
    layer, holder = wrapped(bias, slot_kinds, adapters, max_run)
    tpr = 3
    x = torch.randn(len(rows), tpr, IN, generator=torch.Generator().manual_seed(2))
    holder.mapping = holder.backend.plan(Routes.per_token(per_token(rows, tpr)), SLOTS, "cpu")
    assert (holder.mapping.runs is not None) == bool(max_run)
    with torch.no_grad():
        y = layer(x)  # [rows, tpr, out]
        unwrapped = layer.base_layer(x.reshape(-1, IN)).view(len(rows), tpr, OUT)
        for i, slot in enumerate(rows):
            if slot == NO_SLOT:
                assert torch.equal(y[i], unwrapped[i]), "base rows must be bit-exact with the unwrapped layer"
            else:
                ref = adapters[slot_kinds[slot]][0](x[i])
                torch.testing.assert_close(y[i], ref, rtol=0, atol=1e-5)


@pytest.mark.skipif(not kernels.available(), reason="numba is not installed")
@pytest.mark.parametrize("slot_kinds", [TOY_KINDS, ("rslora", "ia3_in", "dora", "ia3_out")], ids=["a", "b"])
def test_overlapped_lora_kernel_matches_peft(toy, slot_kinds):
    """The kernel on the LoRA worker thread beside the base GEMM: every row still equals PEFT (IA3 and DoRA's
    scale rows included), base rows bit-exact."""
    from server.layers.lora_worker import LoraWorker

    bias, adapters = toy
    worker = LoraWorker()
    layer, holder = wrapped(bias, slot_kinds, adapters, kernels.max_run(1), worker)
    rows = [0, NO_SLOT, 1, 2, NO_SLOT, 3, 1]
    x = torch.randn(len(rows), 3, IN, generator=torch.Generator().manual_seed(5))
    holder.mapping = dataclasses.replace(AdapterMapping.build(per_token(rows, 3), SLOTS, max_run=kernels.max_run(1)),
                                         overlap=worker)
    try:
        with torch.no_grad():
            y = layer(x)
            unwrapped = layer.base_layer(x.reshape(-1, IN)).view(len(rows), 3, OUT)
    finally:
        worker.close()
    for i, slot in enumerate(rows):
        if slot == NO_SLOT:
            assert torch.equal(y[i], unwrapped[i])
        else:
            torch.testing.assert_close(y[i], adapters[slot_kinds[slot]][0](x[i]), rtol=0, atol=1e-5)


def test_adapter_linear_empty_mapping_is_the_base_layer(toy):
    bias, adapters = toy
    layer, _ = wrapped(bias, TOY_KINDS, adapters)
    x = torch.randn(2, 5, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def slot_state(layer: AdapterLinear, slot: int):
    shift = None if layer.out_shift is None else layer.out_shift[slot].clone()
    return (layer.lora_a[slot].clone(), layer.lora_b[slot].clone(), layer.in_scale[slot].clone(),
            layer.out_scale[slot].clone(), shift, layer.ranks[slot], slot in layer.in_scaled,
            slot in layer.out_scaled)


def assert_same_state(a, b):
    for u, v in zip(a, b, strict=True):
        assert (torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v), (u, v)


def test_identity_row_survives_full_slots_and_reset_leaves_no_residue(toy):
    bias, adapters = toy
    fresh, _ = wrapped(bias, (), adapters)
    layer, holder = wrapped(bias, TOY_KINDS, adapters)
    # the identity row (index SLOTS) is what base tokens read: loading every slot must not touch it
    assert torch.equal(layer.in_scale[SLOTS], torch.ones(IN))
    assert torch.equal(layer.out_scale[SLOTS], torch.ones(OUT))
    if bias:
        assert torch.equal(layer.out_shift[SLOTS], torch.zeros(OUT))
    for slot in range(SLOTS):
        layer.bank.reset(slot)
        assert_same_state(slot_state(layer, slot), slot_state(fresh, slot))
    # a LoRA loaded where DoRA / IA3 lived must see none of their scales
    layer.bank.fill_layers(1, [adapters["lora"][1]])  # slot 1 held DoRA
    layer.bank.fill_layers(3, [adapters["lora"][1]])  # slot 3 held input IA3
    x = torch.randn(3, 2, IN)
    holder.mapping = AdapterMapping.build(per_token([1, 3, NO_SLOT], 2), SLOTS)
    with torch.no_grad():
        y, ref = layer(x), adapters["lora"][0](x)
    torch.testing.assert_close(y[:2], ref[:2], rtol=0, atol=1e-5)
    assert torch.equal(y[2], layer.base_layer(x.reshape(-1, IN)).view(3, 2, OUT)[2])


def test_fill_without_a_module_leaves_the_layer_base(toy):
    bias, adapters = toy
    layer, holder = wrapped(bias, TOY_KINDS, adapters)
    layer.bank.fill_layers(1, [None])  # e.g. an adapter that does not target this module
    x = torch.randn(2, 4, IN)
    holder.mapping = AdapterMapping.build(per_token([1, 1], 4), SLOTS)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x.reshape(-1, IN)).view(2, 4, OUT))


LORA_PATHS = ("segments", "grouped") + (("numba",) if kernels.available() else ())


def mapping_for_path(rows, tpr, path: str) -> AdapterMapping:
    """The step's mapping, forced onto one LoRA path (layers take runs, then groups, then segments)."""
    m = AdapterMapping.build(per_token(rows, tpr), SLOTS, max_run=kernels.max_run(1) if path == "numba" else 0)
    if path == "segments":
        m = dataclasses.replace(m, groups=None)
    assert {"numba": m.runs, "grouped": m.groups, "segments": m.segments}[path], path
    return m


@pytest.mark.parametrize("poison", ["nan", "inf"])
@pytest.mark.parametrize("path", LORA_PATHS)
def test_non_finite_slot_never_reaches_other_rows(toy, path, poison):
    """Tenant isolation: a slot holding NaN / Inf (in A, B and the scale rows: whatever got in) changes only the
    tokens routed to it. Every other row still equals PEFT, whether the poisoned slot is in the step (slot 1) or
    only inside the slot range the grouped op covers (slot 2 of 0..3)."""
    bias, adapters = toy
    layer, holder = wrapped(bias, ("lora", "lora", "lora", "lora"), adapters, kernels.max_run(1) if path == "numba"
                            else 0)
    bad = float(poison)
    with torch.no_grad():
        for slot in (1, 2):
            layer.lora_a[slot, 0, 0] = bad
            layer.lora_b[slot, 1, 2] = -bad
            layer.out_scale[slot, 3] = bad
            layer.out_scaled.add(slot)
    rows = [0, 1, NO_SLOT, 3, 0, 3, 0]  # 0 and 3 are healthy; padding in the grouped op points at token 0
    x = torch.randn(len(rows), 3, IN, generator=torch.Generator().manual_seed(4))
    holder.mapping = mapping_for_path(rows, 3, path)
    with torch.no_grad():
        y = layer(x)
        ref = adapters["lora"][0](x)
        base = layer.base_layer(x.reshape(-1, IN)).view(len(rows), 3, OUT)
    for i, slot in enumerate(rows):
        if slot == NO_SLOT:
            assert torch.equal(y[i], base[i])
        elif slot != 1:
            torch.testing.assert_close(y[i], ref[i], rtol=0, atol=1e-5)
    assert not torch.isfinite(y[1]).all()  # the poisoned tenant's own row does see its values


# ---------------------------------------------------------------- grouped (bmm) op

@pytest.mark.parametrize("rows, tpr", [([0, 2, 2, NO_SLOT, 3, 0], 1), ([1, NO_SLOT, 3], 4), ([3, 1, 1, 1], 2)])
def test_lora_grouped_matches_reference(rows, tpr):
    """The fast op equals the per-token contract; slots of smaller rank are computed at the group's rank and
    their zero rows add nothing; base tokens and padding leave rows untouched."""
    gen = torch.Generator().manual_seed(3)
    ranks = [2, 5, 0, 8]
    a, b = random_slots(ranks, gen)
    for s, r in enumerate(ranks):  # the layer's invariant: rows past the live rank are zero
        a[s, r:] = 0
        b[s, r:] = 0
    m = AdapterMapping.build(per_token(rows, tpr), num_slots=SLOTS)
    assert m.groups is not None
    n = len(rows) * tpr
    x, y = torch.randn(n, IN, generator=gen), torch.randn(n, OUT, generator=gen)
    token_slots = [s for s in rows for _ in range(tpr)]
    want = per_token_reference(y, x, a, b, ranks, token_slots)
    got = y.clone()
    lora_grouped(got, x, a, b, max(ranks[m.groups.lo:m.groups.hi]), m.groups)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t, s in enumerate(token_slots):
        if s == NO_SLOT or ranks[s] == 0:
            assert torch.equal(got[t], y[t])


def test_skewed_prefill_falls_back_to_segments():
    """One long prompt on slot 0 and a short one on slot 3: padding every group to the long one would cost
    far more than the loop, so the mapping carries no groups."""
    m = AdapterMapping.build(per_token([0] * 50 + [3], 8), num_slots=SLOTS)
    assert m.groups is None and [s for s, *_ in m.segments] == [0, 3]


# ---------------------------------------------------------------- dense base weight (DoRA's norm reads it)

@pytest.mark.parametrize("double_quant", [False, True], ids=["plain-scales", "nested-scales"])
def test_dense_weight_of_a_4bit_layer_repacked_for_the_cpu_kernel(double_quant):
    """On CPUs with AVX512-BF16 bitsandbytes repacks a Linear4bit at its first forward (another byte order,
    block scales transposed and in bf16). dense_weight must see through that without undoing it in the layer;
    reading the packed bytes plainly gives a different, wrong matrix (what PEFT 0.21's DoRA does there).
    256 inputs = 4 blocks per row, so a transposed scale table cannot pass unnoticed."""
    bnb = pytest.importorskip("bitsandbytes")
    from server.layers.adapter_linear import dense_weight

    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 256, generator=gen) * torch.linspace(0.1, 3, 256)  # scales differ across blocks
    layer = bnb.nn.Linear4bit(256, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32,
                              compress_statistics=double_quant)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
    layer = layer.to("cpu").eval()  # quantizes
    before = dense_weight(layer)
    w = layer.weight
    w.data, w.quant_state = bnb.functional._convert_weight_packed_for_cpu(w.data, w.quant_state)
    packed, scales = w.data.clone(), w.quant_state.absmax.clone()
    after = dense_weight(layer)
    assert torch.equal(w.data, packed) and torch.equal(w.quant_state.absmax, scales)  # the layer is untouched
    assert w.quant_state.packing_format_for_cpu
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-2 * scale  # only the bf16 rounding of the block scales
    naive = bnb.functional.dequantize_4bit(packed, w.quant_state).float()
    assert naive.shape != before.shape or (naive - before).abs().max() > 0.1 * scale
    if getattr(layer, "support_avx512bf16_for_cpu", False):  # the packed kernel runs here: it computes `after`
        x = torch.randn(3, 256, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ after.T, rtol=2e-2, atol=2e-2 * (x @ after.T).abs().max())


# ---------------------------------------------------------------- scales and mixtures

def mixture_routes():
    """Tokens 0-1 on slot 0 at 0.5; 2-3 a 2-way mixture (slot 0 at 0.7, slot 3 at -0.3); 4 base; 5-6 a 3-way
    mixture with a component at 0 (slots 2, 3, 0 at 1.0, 0.0, -1.25); 7 on slot 3 at 1."""
    entries = [(0, 0, 0.5), (1, 0, 0.5), (2, 0, 0.7), (2, 3, -0.3), (3, 0, 0.7), (3, 3, -0.3),
               (5, 2, 1.0), (5, 3, 0.0), (5, 0, -1.25), (6, 2, 1.0), (6, 3, 0.0), (6, 0, -1.25), (7, 3, 1.0)]
    tok, slot, scale = (np.array(col) for col in zip(*entries))
    return Routes(tok.astype(np.int64), slot.astype(np.int64), scale.astype(np.float64), 8), entries


@pytest.mark.parametrize("path", LORA_PATHS)
def test_scaled_and_mixed_routes_match_the_per_entry_sum(path):
    """Each token gets the sum over its entries of scale x that slot's delta, on every LoRA path; base tokens
    are untouched bit for bit."""
    gen = torch.Generator().manual_seed(7)
    ranks = [3, 5, 8, 2]
    a, b = random_slots(ranks, gen)
    for s, r in enumerate(ranks):  # the layer's invariant the grouped op relies on
        a[s, r:] = 0
        b[s, r:] = 0
    routes, entries = mixture_routes()
    x, y = torch.randn(8, IN, generator=gen), torch.randn(8, OUT, generator=gen)
    want = y.clone()
    for t, s, c in entries:
        want[t] += c * ((x[t] @ a[s, :ranks[s]].T) @ b[s, :ranks[s]])
    m = AdapterMapping.route(routes, SLOTS, max_run=kernels.max_run(1) if path == "numba" else 0)
    if path == "segments":
        m = dataclasses.replace(m, groups=None)
    got = y.clone()
    if path == "numba":
        kernels.lora_runs(got, x, a.numpy(), b.numpy(), np.array(ranks, dtype=np.int64), m.runs)
    elif path == "grouped":
        lora_grouped(got, x, a, b, max(ranks[m.groups.lo:m.groups.hi]), m.groups)
    else:
        lora_segments(got, x, a, b, ranks, m.segments)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[4], y[4])


def test_a_whole_step_on_one_scaled_adapter_keeps_the_no_gather_path():
    m = AdapterMapping.route(Routes(np.arange(4), np.full(4, 2), np.full(4, 0.5), 4), SLOTS)
    assert m.segments == ((2, None, 0.5),)
