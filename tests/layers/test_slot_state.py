"""Per-slot state has one writer, the SlotBank (server/layers/slot_bank.py).

Two checks: on the source, no module of the server but slot_bank.py writes into a slot tensor or a slot's books
(``ranks``, ``in_scaled``, ``out_scaled``); and in use, one slot taken by adapter after adapter of other kinds,
ranks and scalings, through both fills (packed per bank and layer by layer) and clears, gives PEFT's outputs every
time and leaves nothing behind."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from support import peft_model_for
from transformers import AutoModelForCausalLM

import server
from server.adapters.formats import check_against_base, load_adapter_dir
from server.adapters.manager import AdapterManager
from server.layers.inject import target_shapes, wrap_model
from server.layers.mapping import MappingHolder

SERVER = Path(server.__file__).parent
OWNER = SERVER / "layers" / "slot_bank.py"
STATE = {"lora_a", "lora_b", "in_scale", "out_scale", "out_shift", "ranks", "in_scaled", "out_scaled"}
SET_MUTATORS = {"add", "discard", "remove", "clear", "update", "pop", "difference_update", "intersection_update",
                "symmetric_difference_update"}


def _reaches_state(node: ast.AST) -> bool:
    """Whether the expression ``node`` is, or is part of, a slot state attribute (x.ranks[s], x.lora_a[s].view())."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        if isinstance(node, ast.Attribute) and node.attr in STATE:
            return True
        node = node.func if isinstance(node, ast.Call) else node.value
    return False


def _targets(node: ast.AST):
    for t in getattr(node, "targets", None) or [getattr(node, "target", None)]:
        yield from (t.elts if isinstance(t, ast.Tuple) else [t])


def state_writes(source: str) -> list[int]:
    """Line numbers where ``source`` writes slot state: assigns into it (``x.ranks[s] = r``; rebinding the attribute
    itself, ``self.ranks = view``, is how a reader takes its view), deletes from it, or calls an in-place torch op
    (``copy_``, ``zero_``, ...) or a set mutator on it."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            for t in _targets(node):
                if isinstance(t, ast.Subscript) and _reaches_state(t.value) or \
                        isinstance(t, ast.Attribute) and _reaches_state(t.value) or \
                        isinstance(node, (ast.AugAssign, ast.Delete)) and _reaches_state(t):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            mutates = (method.endswith("_") and not method.startswith("_")) or method in SET_MUTATORS
            if mutates and _reaches_state(node.func.value):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_checker_sees_every_kind_of_write():
    source = ("self.ranks = bank.ranks[pos]\n"           # a reader taking its view: fine
              "r = layer.ranks[slot]\n"                  # reading: fine
              "layer.ranks[slot] = 3\n"                  # 3
              "layer.lora_a[slot, :r].copy_(a)\n"        # 4
              "self.out_scaled.add(slot)\n"              # 5
              "layer.lora_b[slot].view(-1).zero_()\n"    # 6
              "layer.in_scale[slot] *= 2\n"              # 7
              "y.index_add_(0, idx, layer.lora_b[s])\n"  # writes y, reads the slot: fine
              "a, layer.ranks[1] = 1, 2\n")              # 9
    assert state_writes(source) == [3, 4, 5, 6, 7, 9]


def test_only_the_slot_bank_writes_slot_state():
    modules = [p for p in SERVER.rglob("*.py") if p != OWNER]
    assert len(modules) > 50 and (SERVER / "layers" / "adapter_linear.py") in modules
    bad = {str(p.relative_to(SERVER)): lines for p in modules if (lines := state_writes(p.read_text()))}
    assert not bad, f"slot state written outside SlotBank: {bad}"
    assert state_writes(OWNER.read_text()), "the checker must see the owner's own writes"


# ---------------------------------------------------------------- one slot, adapter after adapter

# (adapter, packed per bank?): every kind, ranks 8 / 4 / patterned 2-8 / AdaLoRA's, scalings from alpha, rsLoRA
# and alpha_pattern; each fill path follows the other and itself
SEQUENCE = [("lora", True), ("lora_pattern", False), ("ia3", True), ("dora", False), ("rslora", True),
            ("lora", False), ("adalora", True), ("dora", True), ("lora_pattern", True), ("ia3", False), ("lora", True)]


@pytest.fixture(scope="module")
def model_and_manager(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    holder = MappingHolder()
    layers = wrap_model(model, holder, 1, 8, torch.float32, torch.device("cpu"))
    return model.eval(), layers, AdapterManager(layers, holder, 1, torch.device("cpu"))


def host_weights(adapters, name, packed, layers, manager):
    """The adapter as the store hands it over: packed for the banks with DoRA's factors (ModelRunner.prepare_dora),
    or as read (every bank then fills layer by layer, DoRA's factors computed at the fill)."""
    w = load_adapter_dir(adapters[name], name)
    check_against_base(w, target_shapes(layers), 8)
    if packed:
        for path, mw in w.modules.items():
            if mw.magnitude is not None:
                layers[path].prepare_dora(mw)
        w.prepare_slots(manager.layout)
        assert w.packed
    return w


def test_one_slot_refilled_through_both_fills_equals_peft(model_and_manager, tiny_model_dir, adapters):
    model, layers, manager = model_and_manager
    seq = torch.randint(6, 300, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    for layer in layers.values():  # the layer reads the bank's books, it holds none of its own
        bank, pos = layer.bank, layer.position
        assert layer.ranks.base is bank.ranks and layer.ranks is not bank.ranks[pos]
        assert layer.in_scaled is bank.in_scaled[pos] and layer.out_scaled is bank.out_scaled[pos]
    oracles = {}
    for i, (name, packed) in enumerate(SEQUENCE):
        w = host_weights(adapters, name, packed, layers, manager)
        key = (name, i)
        manager.activate([[(key, 1.0)]], [len(seq)], lambda k: w)  # one slot: the previous adapter makes way
        assert manager.slot_of == {key: 0}
        for path, layer in layers.items():
            mw = w.modules.get(path)
            assert layer.ranks[0] == (0 if mw is None else mw.rank), (name, path)
            assert (0 in layer.in_scaled) == (mw is not None and mw.ia3 is not None and mw.ia3_on_input), (name, path)
        with torch.no_grad():
            ours = model(input_ids=torch.tensor([seq])).logits[0]
        manager.clear()
        if name not in oracles:
            oracles[name] = peft_model_for(tiny_model_dir, adapters[name])
        with torch.no_grad():
            ref = oracles[name](input_ids=torch.tensor([seq])).logits[0]
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"step {i}: {name} ({'packed' if packed else 'layer by layer'}) {diff:.3g} from PEFT"
        if i % 3 == 2:
            manager.evict(key)  # a plain clear between some fills; the others clear as they fill
    manager.evict(key)
    fresh = [torch.zeros(1), torch.zeros(1), torch.ones(1), torch.ones(1)]
    for path, layer in layers.items():
        assert layer.ranks[0] == 0 and not layer.in_scaled and not layer.out_scaled, path
        for t, value in zip((layer.lora_a, layer.lora_b, layer.in_scale, layer.out_scale), fresh):
            assert torch.equal(t[0], value.expand_as(t[0])), path
        if layer.out_shift is not None:
            assert not layer.out_shift[0].any(), path


# ---------------------------------------------------------------- the step's ranks

def test_step_ranks_come_from_the_banks_books_once_a_step_and_follow_every_write():
    """A layer runs the grouped op over the step's slot range, and the Triton kernels over the step's slots, at the
    largest live rank there: read from the bank's books once per bank and step, and again after any fill."""
    from server.layers.host_weights import ModuleWeights
    from server.layers.mapping import AdapterMapping, Routes
    from server.layers.slot_bank import SlotBank

    bank = SlotBank(3, 4, 4, False, 6, 8, torch.float32, torch.device("cpu"))

    def fill(slot, ranks):
        bank.fill_layers(slot, [ModuleWeights(a=torch.ones(r, 4), slot_b=torch.ones(r, 4)) if r else None
                                for r in ranks])

    fill(1, (2, 0, 5))
    fill(2, (0, 6, 0))  # inside the range of slots 1-3, not in the step
    fill(3, (4, 1, 0))
    fill(4, (8, 8, 8))  # outside it
    routes = Routes(np.arange(4), np.array([1, 3, 3, 1]), np.ones(4), 4)
    grouped = AdapterMapping.route(routes, 6)
    assert (grouped.groups.lo, grouped.groups.hi) == (1, 4)
    assert grouped.live_ranks(bank) == [4, 6, 5]
    assert grouped.live_ranks(bank) is grouped.live_ranks(bank)  # once per step
    fill(3, (7, 0, 0))  # the same mapping after a write: read again
    assert grouped.live_ranks(bank) == [7, 6, 5]
    bank.reset(2)
    assert grouped.live_ranks(bank) == [7, 0, 5]
    pytest.importorskip("triton")
    from server.layers.lora_backend import TritonLora

    plan = TritonLora().plan(routes, 6, torch.device("cpu"))
    assert plan.live_ranks(bank) == [7, 0, 5] and plan.triton.slots.tolist() == [1, 3]
    fill(2, (0, 8, 0))  # not among the Triton plan's slots
    assert plan.live_ranks(bank) == [7, 0, 5]


def test_the_steps_scales_are_put_in_the_slots_dtype_once_with_the_same_values():
    """A bfloat16 model's grouped op multiplies each entry's delta by its scale in bfloat16: the plan casts the step's
    scales once (TorchLora(dtype)), which gives bit for bit what each layer casting the float32 scales gave."""
    from torch import nn

    from server.layers.adapter_linear import AdapterLinear
    from server.layers.host_weights import ModuleWeights
    from server.layers.lora_backend import TorchLora
    from server.layers.mapping import MappingHolder, Routes

    bf16, gen = torch.bfloat16, torch.Generator().manual_seed(7)
    holder = MappingHolder()
    layer = AdapterLinear(nn.Linear(16, 12, dtype=bf16), holder, 4, 8, bf16, torch.device("cpu"))
    for slot, rank in ((0, 8), (1, 3), (3, 5)):
        layer.bank.fill_layers(slot, [ModuleWeights(a=torch.randn(rank, 16, generator=gen),
                                                    slot_b=torch.randn(rank, 12, generator=gen))])
    # a mixture (token 1), scaled adapters, a base token (4)
    routes = Routes(np.array([0, 1, 1, 2, 3, 5]), np.array([0, 1, 3, 3, 0, 1]),
                    np.array([0.3, -1.7, 2 / 3, 1.0, 0.1, 1.0]), 6)
    x = torch.randn(6, 16, generator=gen).to(bf16)
    outs = []
    for backend in (TorchLora(), TorchLora(bf16)):
        holder.mapping = backend.plan(routes, 4, torch.device("cpu"))
        assert holder.mapping.groups.weight.dtype == backend.dtype
        with torch.no_grad():
            outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0][0], layer.base_layer(x)[0])  # the adapters did apply
