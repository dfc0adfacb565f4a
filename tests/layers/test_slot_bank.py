"""Slot fills across devices: every tensor an adapter brings lives on the host, the slots on the model's
device. Run here with the slots on the ``meta`` device (shapes and devices only, no data): any host/device
mix-up in the fill or the activation raises, as it would on a GPU, without one."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from support import per_token
from server.adapters.formats import check_against_base, load_adapter_dir
from server.adapters.manager import AdapterManager
from server.layers.inject import target_shapes, wrap_model
from server.layers.mapping import AdapterMapping, MappingHolder

META = torch.device("meta")


def meta_model(tiny_model_dir):
    """The tiny Llama on the meta device, wrapped: its slot banks on meta too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(META)
    holder = MappingHolder()
    layers = wrap_model(model, holder, 4, 8, torch.float32, META)
    return model, holder, layers


@pytest.mark.parametrize("packed", [True, False], ids=["banks", "per-layer"])
def test_fills_and_activation_keep_host_tensors_off_the_device_code_path(tiny_model_dir, adapters, packed):
    """Every kind but DoRA (its factors read the base weights, which meta tensors do not hold), packed per bank
    (one copy per bank, index_copy for adapters that target some members only: rsLoRA's q/v/down) or not (the
    banks fill layer by layer)."""
    model, holder, layers = meta_model(tiny_model_dir)
    manager = AdapterManager(layers, holder, 4, META)
    host = {}
    for name in ("lora", "rslora", "lora_pattern", "ia3", "adalora", "lora2"):
        w = load_adapter_dir(adapters[name], name)
        check_against_base(w, target_shapes(layers), 8)
        if packed:
            w.prepare_slots(manager.layout)
        host[(name, 0)] = w
    keys = list(host)
    for start in (0, 4):  # more adapters than slots: fills into used slots too
        batch = keys[start:start + 4] or keys[:2]
        manager.activate([[(k, 1.0)] for k in batch], [3] * len(batch), host.__getitem__)
        assert all(manager.resident(k) for k in batch)
    layer = next(iter(layers.values()))
    assert layer.lora_a.device == META


def test_a_wrapped_layer_runs_on_the_device_with_a_step_mapping(tiny_model_dir, adapters):
    model, holder, layers = meta_model(tiny_model_dir)
    manager = AdapterManager(layers, holder, 4, META)
    w = load_adapter_dir(adapters["lora"], "lora")
    w.prepare_slots(manager.layout)
    mapping = manager.activate([[(("lora", 0), 0.5)], []], [2, 3], lambda k: w)
    assert mapping.scale_index.device == META and all(i is None or i.device == META for _, i, _ in mapping.segments)
    layer = layers["model.layers.0.self_attn.q_proj"]
    y = layer(torch.empty(1, 5, layer.in_features, device=META))
    assert y.shape == (1, 5, layer.out_features) and y.device == META
    assert AdapterMapping.build(per_token([0, -1], 2), 4, META).scale_index.device == META


def test_fill_stream_is_nothing_off_cuda():
    from server.layers.slot_bank import FillStream

    for device in ("cpu", "meta"):
        fills = FillStream(torch.device(device))
        assert fills.stream is None
        with fills():
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fills_on_the_side_stream_land_before_the_next_forward(tiny_model_dir, adapters):
    """On CUDA: fills queued on the side stream from pinned memory hold the host tensors' values once the
    compute stream reaches the next op, whatever the fills had to evict (more adapters than slots)."""
    cuda = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(cuda)
    holder = MappingHolder()
    layers = wrap_model(model, holder, 2, 8, torch.float32, cuda)
    manager = AdapterManager(layers, holder, 2, cuda)
    host = {}
    for name in ("lora", "rslora", "lora2"):
        w = load_adapter_dir(adapters[name], name)
        check_against_base(w, target_shapes(layers), 8)
        w.prepare_slots(manager.layout)
        host[(name, 0)] = w
    for batch in ([("lora", 0), ("rslora", 0)], [("lora2", 0)], [("rslora", 0), ("lora", 0)]):
        manager.activate([[(k, 1.0)] for k in batch], [2] * len(batch), host.__getitem__)
        for key in batch:
            slot = manager.slot_of[key]
            for path, mw in host[key].modules.items():
                layer = layers[path]
                r = mw.rank
                assert torch.equal(layer.lora_a[slot, :r].cpu(), mw.a.to(layer.lora_a.dtype)), (key, path)
                assert layer.ranks[slot] == r
