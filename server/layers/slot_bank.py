"""SlotBank: the slot tensors of same-shaped AdapterLinear layers, stacked into one tensor per kind, and the one
writer of every per-slot state those layers read.

Member i of a bank sees ``bank.lora_a[i]`` as its own ``lora_a`` [num_slots, max_rank, in] (a view), so the
forward path is unchanged; what changes is filling a slot: an adapter packed per bank on the host
(host_weights.PackedBank) goes in with one copy per tensor kind for the whole bank (a handful of copies per
adapter) instead of a few per layer (hundreds), which is what made a host -> device swap cost Python time, not bytes.

Who writes what:
    SlotBank           every per-slot state: the device tensors (lora_a, lora_b, in_scale, out_scale, out_shift) and
                       the books (``ranks`` [members, num_slots], the live rank of each member's slots; ``in_scaled``
                       / ``out_scaled``, per member the slots whose scale rows are not the identity), through
                       ``fill`` (a packed adapter), ``fill_layers`` (one adapter's modules layer by layer: DoRA
                       before its factors, banks of mixed kinds) and ``reset``. Each of them bumps ``version``.
    AdapterLinear      reads its member's views of all of the above (its ``ranks`` is a row of the bank's array,
                       its ``in_scaled`` / ``out_scaled`` the bank's sets), never writes them; its
                       ``prepare_dora`` writes DoRA's factors into the host ModuleWeights, not into a slot.
    AdapterManager     (adapters/manager.py) decides which adapter goes into which slot (LRU, pins) and calls the
                       three methods above; it holds no slot state of its own.
The books are exact, so the two fills can follow each other in one slot in any order.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from server.layers.host_weights import ModuleWeights, PackedBank


class SlotBank:
    def __init__(self, size: int, in_features: int, out_features: int, bias: bool, num_slots: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device):
        s = num_slots
        self.lora_a = torch.zeros(size, s, max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(size, s, max_rank, out_features, dtype=dtype, device=device)
        # per member, row s (the last) is the identity row used by base tokens
        self.in_scale = torch.ones(size, s + 1, in_features, dtype=dtype, device=device)
        self.out_scale = torch.ones(size, s + 1, out_features, dtype=dtype, device=device)
        self.out_shift = torch.zeros(size, s + 1, out_features, dtype=dtype, device=device) if bias else None
        self.ranks = np.zeros((size, s), dtype=np.int64)  # live rank per member and slot (rows past it are zero)
        self.in_scaled: list[set[int]] = [set() for _ in range(size)]  # per member: slots with an input scale row
        self.out_scaled: list[set[int]] = [set() for _ in range(size)]  # ... an output scale (and shift) row
        self.version = 0  # bumped by every write: what a step's cached view of the books is checked against
        self.layers: list = []  # the AdapterLinear members, in bank order
        self.paths: list[str] = []  # their module paths (set by wrap_model)

    def join(self, layer) -> int:
        """Add ``layer`` as the next member; its position."""
        self.layers.append(layer)
        return len(self.layers) - 1

    def member(self, pos: int) -> dict[str, torch.Tensor | None]:
        """Member ``pos``'s slot tensors: views into the bank."""
        return {"lora_a": self.lora_a[pos], "lora_b": self.lora_b[pos], "in_scale": self.in_scale[pos],
                "out_scale": self.out_scale[pos],
                "out_shift": None if self.out_shift is None else self.out_shift[pos]}

    @torch.no_grad()
    def reset(self, slot: int) -> None:
        """Slot ``slot`` back to "no adapter" in every member."""
        self._clear(slot, keep_rank=0, covers_all=False)

    @torch.no_grad()
    def fill(self, slot: int, packed: PackedBank) -> None:
        """Load one adapter's packed tensors for this bank into ``slot``; members it does not target get none."""
        covers_all = len(packed.positions) == len(self.layers)
        self._clear(slot, keep_rank=packed.rank, covers_all=covers_all)
        if packed.a is not None:
            r = packed.rank
            _put(self.lora_a[:, slot, :r], packed.index, packed.a)
            _put(self.lora_b[:, slot, :r], packed.index, packed.b)
            self.ranks[packed.positions, slot] = packed.ranks
            if packed.out_scale is not None:  # DoRA
                _put(self.out_scale[:, slot], packed.index, packed.out_scale)
                if self.out_shift is not None and packed.out_shift is not None:
                    _put(self.out_shift[:, slot], packed.index, packed.out_shift)
                for pos in packed.positions:
                    self.out_scaled[pos].add(slot)
        else:
            on_input = packed.ia3_on_input
            _put((self.in_scale if on_input else self.out_scale)[:, slot], packed.index, packed.ia3)
            for pos in packed.positions:
                (self.in_scaled if on_input else self.out_scaled)[pos].add(slot)

    @torch.no_grad()
    def fill_layers(self, slot: int, modules: list[ModuleWeights | None]) -> None:
        """Load one adapter into ``slot`` member by member: ``modules`` holds each member's tensors, in bank order
        (None: the adapter skips that member). The path of adapters not packed for the bank."""
        self.reset(slot)
        for pos, mw in enumerate(modules):
            if mw is not None:
                self._put_member(slot, pos, mw)

    def _put_member(self, slot: int, pos: int, mw: ModuleWeights) -> None:
        if mw.ia3 is not None:
            on_input = mw.ia3_on_input
            (self.in_scale if on_input else self.out_scale)[pos, slot].copy_(mw.ia3)
            (self.in_scaled if on_input else self.out_scaled)[pos].add(slot)
            return
        if mw.magnitude is not None:
            self.layers[pos].prepare_dora(mw)  # done already when the loader thread prepared the adapter
            self.out_scale[pos, slot].copy_(mw.dora_scale)
            if self.out_shift is not None:
                self.out_shift[pos, slot].copy_(mw.dora_shift)
            self.out_scaled[pos].add(slot)
        elif mw.slot_b is None:
            mw.slot_b = mw.scaled_bt().to(self.lora_b.dtype)
        r = mw.rank
        self.lora_a[pos, slot, :r].copy_(mw.a)
        self.lora_b[pos, slot, :r].copy_(mw.slot_b)
        self.ranks[pos, slot] = r

    def _clear(self, slot: int, keep_rank: int, covers_all: bool) -> None:
        """Zero what a fill of rank ``keep_rank`` would not overwrite, restore the scale rows, reset the books.
        Rows past a member's live rank are always zero, so only live rows can need it."""
        self.version += 1
        live = int(self.ranks[:, slot].max())
        if live > keep_rank or (live and not covers_all):
            self.lora_a[:, slot, :live].zero_()
            self.lora_b[:, slot, :live].zero_()
        if any(slot in s for s in self.in_scaled) or any(slot in s for s in self.out_scaled):
            self.in_scale[:, slot].fill_(1)
            self.out_scale[:, slot].fill_(1)
            if self.out_shift is not None:
                self.out_shift[:, slot].zero_()
        self.ranks[:, slot] = 0
        for scaled in (*self.in_scaled, *self.out_scaled):
            scaled.discard(slot)


class FillStream:
    """Where slot fills run. On CUDA: a side stream, entered with ``with fills():`` around a step's fills; host
    tensors go through pinned memory with non-blocking copies, so the step thread queues them and goes on
    (pageable copies block it until each one lands). The side stream first waits for the work already queued on
    the compute stream (a slot being refilled may still be read by an earlier forward), and the compute stream
    then waits for the fills (the next forward reads them): fills never race the forwards, and overlap the
    host's work, not the GPU's. Elsewhere (CPU, meta) the context does nothing."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def __call__(self):
        if self.stream is None:
            yield
            return
        compute = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(compute)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            compute.wait_stream(self.stream)


def _put(dst: torch.Tensor, index: torch.Tensor | None, src: torch.Tensor) -> None:
    """dst[:n] = src, or dst[index] = src for an adapter that targets only some members. ``src`` (and ``index``)
    live on the host, ``dst`` on the model's device: index_copy_ needs all three on one device. To a GPU the
    source goes through pinned memory (torch's caching host allocator keeps the block until the copy is done)."""
    cuda = dst.device.type == "cuda"
    if cuda and not src.is_pinned():
        src = src.pin_memory()
    if index is None:
        dst[:len(src)].copy_(src, non_blocking=cuda)
    else:
        dst.index_copy_(0, index.to(dst.device, non_blocking=cuda),
                        src.to(device=dst.device, dtype=dst.dtype, non_blocking=cuda))
