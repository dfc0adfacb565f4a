"""AdapterLinear: wraps one base linear layer and applies, per token, the adapter of that token's slot.

Semantics for a token routed to slot s (PEFT's, for the adapter loaded in s), with base(x) = W x + b:
    LoRA/AdaLoRA:  base(x) + scaling * B A x
    DoRA:          base(x) * d + b * (1 - d) + d * scaling * B A x,   d = m / ||W + scaling B A||_row
    IA3 (output):  base(x) * l           IA3 (feedforward, input):  base(x * l)
    no slot:       base(x), bit for bit
All slot tensors are preallocated; loading an adapter is a copy into a slot, never a module-graph change.
The slot tensors and their books (live ranks, scaled slots) belong to the layer's SlotBank, which alone writes
them (slot_bank.py); the layer reads its views of them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from server.layers.gemm import PackedLinear
from server.layers.host_weights import ModuleWeights
from server.layers.mapping import MappingHolder
from server.layers.ops import scale_rows, shift_rows
from server.layers.slot_bank import SlotBank


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear, bitsandbytes Linear8bitLt/Linear4bit or HF Conv1D."""
    if hasattr(layer, "in_features"):
        return layer.in_features, layer.out_features
    return layer.weight.shape[0], layer.weight.shape[1]  # transformers Conv1D stores [in, out]


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The base weight as a float [out, in] matrix, dequantized for bitsandbytes layers."""
    if isinstance(layer, PackedLinear):
        return layer.dense().float()
    w = layer.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb
        return bnb.functional.dequantize_4bit(*_unpacked_4bit(w)).float()
    if kind == "Int8Params":
        import bitsandbytes as bnb
        scb = layer.state.SCB if getattr(layer.state, "SCB", None) is not None else w.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
    if not hasattr(layer, "in_features"):  # Conv1D (fan_in_fan_out)
        return w.detach().T.float()
    return w.detach().float()


def _unpacked_4bit(w) -> tuple[torch.Tensor, object]:
    """(data, quant_state) of a Params4bit in bitsandbytes' standard layout, the layer left as it is.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its fused kernel at the first inference
    forward: another byte order, and the block scales stored transposed, [K / blocksize, N], in bf16. Its
    inverse works on the state it is given (so it gets a copy) and restores the scales' order only for
    double-quantized weights; ours are not, so the transpose is undone here."""
    import bitsandbytes as bnb

    data, state = w.data, w.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    if not state.nested:
        state.absmax = state.absmax.T.reshape(-1).to(state.dtype)  # [K / bs, N] -> [N * K / bs]
    return data, state


class AdapterLinear(nn.Module):
    """The wrapper; ``holder.mapping`` says which slot each token of the current step uses, ``holder.backend``
    how the deltas are computed (lora_backend.py)."""

    def __init__(self, base_layer: nn.Module, holder: MappingHolder, num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, bank: SlotBank | None = None):
        """``bank``: the SlotBank of same-shaped layers this one's slot tensors live in (wrap_model groups
        them); None makes a bank of one."""
        super().__init__()
        self.base_layer = base_layer
        self.holder = holder
        self.num_slots = num_slots
        self.in_features, self.out_features = layer_features(base_layer)
        if bank is None:
            bank = SlotBank(1, self.in_features, self.out_features, getattr(base_layer, "bias", None) is not None,
                            num_slots, max_rank, dtype, device)
        self.bank = bank
        self.position = bank.join(self)
        for name, view in bank.member(self.position).items():  # [S, R, in], [S, R, out], [S + 1, dim]
            self.register_buffer(name, view, persistent=False)
        # the bank's books for this member, read here and written only by the bank (slot_bank.py): the live rank
        # per slot (a row of its array; the CPU kernel reads it as is) and the slots with IA3/DoRA scale rows
        self.ranks = bank.ranks[self.position]
        self.in_scaled = bank.in_scaled[self.position]
        self.out_scaled = bank.out_scaled[self.position]
        # numpy views of the slot tensors for the CPU kernel (same memory; the tensors are never reallocated)
        cpu32 = self.lora_a.device.type == "cpu" and self.lora_a.dtype == torch.float32
        self.numpy_slots = (self.lora_a.numpy(), self.lora_b.numpy()) if cpu32 else None
        self._views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:  # HF code sometimes reads .weight (dtype/device checks)
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapping = self.holder.mapping
        if mapping.empty:
            return self.base_layer(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [num_tokens, in]
        if not self.in_scaled.isdisjoint(mapping.slots):
            x2 = scale_rows(x2, self.in_scale, mapping.scale_index)
        return self.holder.backend.forward(self, x2, mapping).view(*lead, self.out_features)

    def base_out(self, x2: torch.Tensor, mapping) -> torch.Tensor:
        """The base layer's output for the step's tokens, with IA3 output and DoRA scaling: [num_tokens, out]."""
        y = self.base_layer(x2)
        if not self.out_scaled.isdisjoint(mapping.slots):
            y = scale_rows(y, self.out_scale, mapping.scale_index)
            if self.out_shift is not None:
                y = shift_rows(y, self.out_shift, mapping.scale_index)
        return y

    def range_views(self, lo: int, hi: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T [g, in, r], B [g, r, out]) over slots [lo, hi) at ``rank``. Views into the slot tensors, which
        are never reallocated, so they are cached: consecutive steps ask for the same ones."""
        return self._cached((lo, hi, rank), lambda: (self.lora_a[lo:hi, :rank].transpose(1, 2),
                                                     self.lora_b[lo:hi, :rank]))

    def slot_views(self, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T [in, r], B [r, out]) of one slot, cached likewise."""
        return self._cached((slot, rank), lambda: (self.lora_a[slot, :rank].T, self.lora_b[slot, :rank]))

    def _cached(self, key: tuple, make):
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 256:
                self._views.clear()
            views = self._views[key] = make()
        return views

    @torch.no_grad()
    def prepare_dora(self, mw: ModuleWeights) -> None:
        """DoRA's factors for this layer, computed once per adapter and kept on the host weights (no slot state:
        SlotBank copies them into a slot):
        d = m / ||W + scaling * B A|| per output row (W dequantized for bitsandbytes layers), the slot-ready
        B with d folded in, and the bias shift b * (1 - d). The engine calls this on the store's loader thread
        (ModelRunner.prepare_dora): it reads the whole base weight, far too slow for the step thread."""
        if mw.dora_scale is not None:
            return
        w = dense_weight(self.base_layer).cpu()
        lora_w = mw.b.float() @ mw.a.float()
        d = mw.magnitude.float() / torch.linalg.norm(w + mw.scaling * lora_w, dim=1)  # [out]
        mw.slot_b = (mw.scaled_bt() * d).to(self.lora_b.dtype)  # [r, out]
        bias = getattr(self.base_layer, "bias", None)
        mw.dora_shift = None if bias is None else bias.detach().float().cpu() * (1 - d)  # [out]
        mw.dora_scale, mw.b = d, None  # B lives on as slot_b
