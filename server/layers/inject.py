"""Wrap every adaptable linear layer of a causal LM once, at start-up."""
from __future__ import annotations

import torch
from torch import nn

from server.layers.adapter_linear import AdapterLinear, layer_features
from server.layers.mapping import MappingHolder
from server.layers.slot_bank import SlotBank


def _adaptable(module: nn.Module) -> bool:
    kind = type(module).__name__
    return isinstance(module, nn.Linear) or kind in ("Linear8bitLt", "Linear4bit", "Conv1D")


def wrap_model(model: nn.Module, holder: MappingHolder, num_slots: int, max_rank: int,
               dtype: torch.dtype, device: torch.device) -> dict[str, AdapterLinear]:
    """Replace each adaptable linear layer (all but the output head) with an AdapterLinear; layers of one
    shape share a SlotBank (see slot_bank.py).

    Returns module path (PEFT's naming, e.g. ``model.layers.0.self_attn.q_proj``) -> wrapper.
    """
    head = model.get_output_embeddings()
    names = [name for name, m in model.named_modules() if _adaptable(m) and m is not head and name]
    shapes: dict[tuple, list[str]] = {}
    for name in names:
        layer = model.get_submodule(name)
        shapes.setdefault((*layer_features(layer), getattr(layer, "bias", None) is not None), []).append(name)
    banks = {shape: SlotBank(len(members), *shape, num_slots, max_rank, dtype, device)
             for shape, members in shapes.items()}
    bank_of = {name: banks[shape] for shape, members in shapes.items() for name in members}
    wrapped = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bank = bank_of[name]
        layer = AdapterLinear(getattr(parent, child), holder, num_slots, max_rank, dtype, device, bank=bank)
        bank.paths.append(name)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return wrapped


def target_shapes(wrapped: dict[str, AdapterLinear]) -> dict[str, tuple[int, int]]:
    return {name: layer_features(layer.base_layer) for name, layer in wrapped.items()}
