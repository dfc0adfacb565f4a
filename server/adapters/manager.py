"""AdapterManager: the device tier. Decides which adapter holds which of the preallocated slots (LRU over them,
pins), has the slot banks fill and clear them (server/layers/slot_bank.py: the banks alone write slot state),
and has the backend plan each step's AdapterMapping.

An adapter is identified on device by its ``AdapterKey``, the SHA-256 of its content (AdapterVersion.key in
server/adapters/versions.py): two names with the same content share one slot, and a name reloaded with other
content has another key, so a slot filled from an older load is never reused for a newer one.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from server.adapters.weights import AdapterWeights
from server.layers.adapter_linear import AdapterLinear
from server.layers.mapping import AdapterMapping, MappingHolder, Routes
from server.layers.slot_bank import FillStream

log = logging.getLogger(__name__)

AdapterKey = str  # the adapter's content hash, hex (AdapterVersion.key)


class AdapterManager:
    def __init__(self, layers: dict[str, AdapterLinear], holder: MappingHolder, num_slots: int,
                 device: torch.device, on_evict: Callable[[AdapterKey], None] | None = None):
        """Each step's mapping is planned by ``holder.backend`` (layers/lora_backend.py)."""
        self.layers = layers
        self.banks = list(dict.fromkeys(layer.bank for layer in layers.values()))
        self.holder = holder
        self.num_slots = num_slots
        self.device = device
        self.on_evict = on_evict
        self.slot_of: OrderedDict[AdapterKey, int] = OrderedDict()  # LRU order: oldest first
        self.pinned: set[AdapterKey] = set()
        self.loads = 0  # slot fills (a lookup that missed)
        self.hits = 0  # lookups of an adapter already in a slot (one per adapter per step)
        self.evictions = 0
        self.fills = FillStream(device)  # a side stream on CUDA (slot_bank.py); nothing elsewhere

    @property
    def layout(self) -> list[list[str]]:
        """Each bank's member paths: what AdapterWeights.prepare_slots packs adapters for."""
        return [bank.paths for bank in self.banks]

    @property
    def free_slots(self) -> list[int]:
        used = set(self.slot_of.values())
        return [s for s in range(self.num_slots) if s not in used]

    def activate(self, seq_uses: list[list[tuple[AdapterKey, float]]], seq_tokens: list[int],
                 weights: Callable[[AdapterKey], AdapterWeights]) -> AdapterMapping:
        """Make every adapter of this step resident, then publish the step's mapping to the layers.

        seq_uses: for each sequence of the flat batch, in batch order, the (adapter, scale) pairs it reads (none
        for the base model; several for a mixture); seq_tokens: how many consecutive tokens each has. The
        scheduler guarantees at most ``num_slots`` distinct adapters per step, so a slot can always be found.
        """
        self.reserve([key for uses in seq_uses for key, _ in uses], weights)
        mapping = self.holder.backend.plan(self._routes(seq_uses, seq_tokens), self.num_slots, self.device)
        self.holder.mapping = mapping
        return mapping

    def _routes(self, seq_uses, seq_tokens) -> Routes:
        """One entry per (token, slot): a mixture naming one content twice (two names of the same files, a name
        and its current name@version) reads it once at the sum of its scales, and a sum of 0 not at all. Two
        entries of one slot on a token made a step of that mixture beside as many base tokens look like "every
        token on one adapter", and the adapter went onto the base rows too."""
        tok, slot, scale, start = [], [], [], 0
        for uses, n in zip(seq_uses, seq_tokens):
            if len(uses) > 1:  # a plain request (one use, every step) needs no merging
                merged: dict = {}
                for key, c in uses:
                    merged[key] = merged.get(key, 0.0) + c
                uses = merged.items()
            for key, c in uses:
                if c == 0:
                    continue
                tok.append(np.arange(start, start + n))
                slot.append(np.full(n, self.slot_of[key]))
                scale.append(np.full(n, c, dtype=np.float64))
            start += n
        if not tok:
            return Routes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), start)
        return Routes(np.concatenate(tok), np.concatenate(slot), np.concatenate(scale), start)

    def reserve(self, keys, weights: Callable[[AdapterKey], AdapterWeights]) -> None:
        """Make every adapter in ``keys`` resident without evicting any of them. The engine calls this once
        per step with the adapters of all its forwards, so a prefill never evicts a decoding row's adapter."""
        needed = {k for k in keys if k is not None}
        if len(needed) > self.num_slots:
            raise RuntimeError(f"{len(needed)} adapters in one step but only {self.num_slots} slots")
        if all(k in self.slot_of for k in needed):  # the common step: nothing to fill, no stream to enter
            for key in needed:
                self.slot_of.move_to_end(key)
            self.hits += len(needed)
            return
        with self.fills():
            for key in needed:
                self._ensure(key, needed, weights)

    def clear(self) -> None:
        self.holder.mapping = AdapterMapping()

    def _ensure(self, key: AdapterKey, needed: set[AdapterKey], weights) -> None:
        if key in self.slot_of:
            self.slot_of.move_to_end(key)
            self.hits += 1
            return
        w = weights(key)  # first: a failing lookup must not cost a resident adapter its slot
        free = self.free_slots
        slot = free[0] if free else self._evict_for(needed)
        for number, bank in enumerate(self.banks):
            packed = w.packed.get(number)
            if packed is not None:
                bank.fill(slot, packed)
            else:  # not packed (mixed kinds in the bank, DoRA before its factors, no module in the bank)
                bank.fill_layers(slot, [w.modules.get(path) for path in bank.paths])
        self.slot_of[key] = slot
        self.loads += 1

    def _evict_for(self, needed: set[AdapterKey]) -> int:
        candidates = [k for k in self.slot_of if k not in needed]
        unpinned = [k for k in candidates if k not in self.pinned]
        victim = (unpinned or candidates)[0]  # LRU first; pinned ones only when nothing else can go
        return self.evict(victim, clear=False)

    def evict(self, key: AdapterKey, clear: bool = True) -> int:
        """Free ``key``'s slot and return it. ``clear=False`` when the caller refills it at once: a fill
        itself clears whatever the new adapter does not overwrite, so no stale weight can leak either way."""
        slot = self.slot_of.pop(key)
        self.evictions += 1
        if clear:
            for bank in self.banks:
                bank.reset(slot)
        if self.on_evict:
            self.on_evict(key)
        return slot

    def pin(self, key: AdapterKey) -> None:
        """Keep ``key``'s slot unless nothing else can be evicted (an operator-pinned adapter)."""
        self.pinned.add(key)

    def resident(self, key: AdapterKey) -> bool:
        return key in self.slot_of
