"""AdapterMapping: which device slot each token of one forward step uses.

Built once per step (the LoRA backend's plan, which the AdapterManager calls after the step's slot fills), on the
model's device, and read by every wrapped layer, so the per-layer work is a few tensor ops, never Python
bookkeeping over rows: the routes (token -> slot, segments or groups or kernel runs), the scale rows, the scales
in the slots' dtype, and each layer's rank for the step (``live_ranks``, read from its bank's books once per bank).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from server.layers.transfer import to_device

NO_SLOT = -1  # a row that runs the plain base model
# a step on one slot alone has a no-gather addmm path (segments ((slot, None),)) that the kernel only beats
# on short runs: 3.4 vs 4.4 ms at 16 tokens, even at 32, behind at 64 (one thread)
ALONE_MAX_RUN = 16


@dataclass(frozen=True)
class Routes:
    """What a step asks of the adapter layers, one entry per (token, adapter it reads): token ``tok[e]`` adds
    ``scale[e]`` times slot ``slot[e]``'s delta. A plain adapter request gives its tokens one entry each at scale
    1; a mixture gives its tokens one entry per component; base tokens have none. A token has at most one entry
    per slot (AdapterManager merges a mixture's repeated components), so one (slot, scale) key over num_tokens
    entries means every token reads that one slot.

    tok: [E] int64   slot: [E] int64   scale: [E] float64   num_tokens: tokens in the flat batch
    """

    tok: np.ndarray
    slot: np.ndarray
    scale: np.ndarray
    num_tokens: int

    @classmethod
    def per_token(cls, token_slots) -> "Routes":
        """One slot (or NO_SLOT) per token, scale 1: the plain single-adapter routing."""
        slots = np.asarray(token_slots, dtype=np.int64)
        tok = np.flatnonzero(slots != NO_SLOT)
        return cls(tok, slots[tok], np.ones(len(tok)), len(slots))

    def keys(self) -> list[tuple[int, float]]:
        """The distinct (slot, scale) pairs, ascending."""
        return sorted(set(zip(self.slot.tolist(), self.scale.tolist())))


@dataclass(frozen=True)
class AdapterMapping:
    """Per-step routing of the flat batch's tokens to adapter slots, each at a scale (see Routes).

    segments:     ((slot, token_index [n] | None, scale), ...) one entry per distinct (slot, scale) in the step;
                  token_index None means "every token" (the whole step reads one slot at one scale).
    scale_index:  [num_tokens] long, the row of each token into a layer's scale tables (its slot, or the
                  identity row ``num_slots`` for base rows; a mixture's tokens point at any of its LoRA slots,
                  whose rows are the identity); None when no token uses a slot.
    slots:        the distinct slots present, for layers to decide cheaply what applies.
    groups:       the same routing as one padded batch, for the grouped (bmm) op, or None when padding
                  would waste too much (skewed prefill) and the per-segment loop is cheaper.
    runs:         the same routing as runs of tokens per slot, each with its scale, for the compiled CPU kernel
                  (kernels.lora_runs); set only when the caller asked for it and no run is longer than
                  ``max_run``. Layers take runs first, then groups, then segments.
    """

    segments: tuple[tuple[int, torch.Tensor | None, float], ...] = ()
    scale_index: torch.Tensor | None = None
    slots: frozenset[int] = field(default_factory=frozenset)
    groups: "SlotGroups | None" = None
    runs: "SlotRuns | None" = None
    overlap: "object | None" = None  # a LoraWorker that computes ``runs`` beside the base GEMM (large steps only)
    triton: "object | None" = None  # the routes laid out for the Triton kernels (lora_triton.TritonPlan)
    # SlotBank -> (its version, live_ranks' list): the step's ranks, filled by the first layer of each bank
    _live: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def empty(self) -> bool:
        return not self.slots

    def live_ranks(self, bank) -> list[int]:
        """Per member of ``bank`` (a SlotBank), the largest live rank over the slots this step's grouped or Triton op
        covers (the grouped op's slot range, else the Triton plan's slots): the rank the op runs that layer at.
        Computed once per bank per step, one numpy op for all its members rather than one per layer; computed
        again only if the bank was written since (its ``version``), so a mapping reused across fills stays right."""
        hit = self._live.get(bank)
        if hit is None or hit[0] != bank.version:
            covered = slice(self.groups.lo, self.groups.hi) if self.groups is not None else self.triton.slots
            hit = self._live[bank] = (bank.version, bank.ranks[:, covered].max(axis=1).tolist())
        return hit[1]

    @classmethod
    def build(cls, token_slots, num_slots: int, device: torch.device | str = "cpu",
              max_run: int = 0, dtype: torch.dtype = torch.float32) -> "AdapterMapping":
        """token_slots: one slot (or NO_SLOT) per token of the step's flat batch, scale 1 (Routes.per_token)."""
        return cls.route(Routes.per_token(token_slots), num_slots, device, max_run, dtype)

    @classmethod
    def route(cls, routes: Routes, num_slots: int, device: torch.device | str = "cpu",
              max_run: int = 0, dtype: torch.dtype = torch.float32,
              alone_max_run: int = ALONE_MAX_RUN) -> "AdapterMapping":
        """The mapping of ``routes``. ``max_run`` > 0 asks for ``runs`` (CPU only); ``dtype``: the slots' dtype,
        which the grouped op's per-entry scales are put in once here rather than by every layer;
        ``alone_max_run``: the longest run that still gets ``runs`` when every token is on one adapter (past it the
        step keeps its no-gather addmm; a caller whose runs go to the LoRA worker, off the step thread, asks for
        more)."""
        present = frozenset(routes.slot.tolist())
        if not present:
            return cls()
        keys = routes.keys()
        if len(keys) == 1 and len(routes.tok) == routes.num_tokens:  # every token on one adapter: no gathers
            slot, scale = keys[0]
            index = torch.full((routes.num_tokens,), slot, dtype=torch.long, device=device)
            runs = SlotRuns.build(routes, min(max_run, alone_max_run)) if max_run else None
            return cls(((slot, None, scale),), index, present, runs=runs)
        runs = SlotRuns.build(routes, max_run) if max_run else None
        segments = tuple((slot, to_device(torch.from_numpy(routes.tok[(routes.slot == slot) & (routes.scale == c)]),
                                          device), c)
                         for slot, c in keys)
        scale_index = cls.scale_index_of(routes, num_slots, device)
        groups = None if runs is not None else SlotGroups.build(routes, present, device, dtype)
        return cls(segments, scale_index, present, groups, runs)


    @staticmethod
    def scale_index_of(routes: Routes, num_slots: int, device) -> torch.Tensor:
        """[num_tokens] the scale-table row of each token: its first entry's slot, ``num_slots`` for base rows."""
        first = np.full(routes.num_tokens, num_slots, dtype=np.int64)
        first[routes.tok[::-1]] = routes.slot[::-1]  # each token's first entry wins
        return to_device(torch.from_numpy(first), device)


@dataclass(frozen=True)
class SlotRuns:
    """The step's routes as runs, one per slot present, for kernels.lora_runs (numpy, CPU): each slot's A and B
    are read once a step however many requests, scales and mixtures use it.

    order:   [num_entries] int64 token indices, run by run (ascending slot, then token); a mixture's token
             appears once per component
    weights: [num_entries] float32, the scale of each entry
    starts:  [num_runs + 1] int64; run j is order[starts[j]:starts[j + 1]]
    slots:   [num_runs] int64, the slot of run j
    """

    order: np.ndarray
    weights: np.ndarray
    starts: np.ndarray
    slots: np.ndarray

    @classmethod
    def build(cls, routes: Routes, max_run: int) -> "SlotRuns | None":
        """None when some slot has more than ``max_run`` entries (GEMM-shaped: torch's path is faster)."""
        by = np.lexsort((routes.tok, routes.slot))  # slot, then token
        slot = routes.slot[by]
        new = np.ones(len(by), dtype=bool)
        new[1:] = slot[1:] != slot[:-1]
        heads = np.flatnonzero(new)
        starts = np.append(heads, len(by)).astype(np.int64)
        if np.diff(starts).max() > max_run:
            return None
        return cls(routes.tok[by].astype(np.int64), routes.scale[by].astype(np.float32), starts,
                   slot[heads].astype(np.int64))

    def split(self, k: int) -> tuple["SlotRuns", "SlotRuns | None"]:
        """Runs [0, k) and [k, n) as two SlotRuns over the same ``order`` (views, no copy); None for an empty
        second part."""
        n = len(self.slots)
        second = None if k >= n else SlotRuns(self.order, self.weights, self.starts[k:], self.slots[k:])
        return SlotRuns(self.order, self.weights, self.starts[:k + 1], self.slots[:k]), second


@dataclass(frozen=True)
class SlotGroups:
    """Routes grouped by slot and padded, so a layer applies k adapters with two bmm calls, not k loops.

    lo, hi:  the slot range [lo, hi) covered (slots in it that the step does not use get empty groups).
    index:   [hi - lo, width] token indices, group g holding slot lo + g's entries; padding points at token 0.
    keep:    [(hi - lo) * width, 1] bool, True for real entries; the op selects on it, so padding adds exactly 0
             to token 0 even when a padded slot holds NaN or Inf.
    weight:  [(hi - lo) * width, 1] scale of each entry in the slots' dtype (what the op multiplies in), or None
             when every entry's is 1.
    flat:    index as [(hi - lo) * width]; padded: whether any entry is padding.
    """

    lo: int
    hi: int
    index: torch.Tensor
    keep: torch.Tensor
    weight: torch.Tensor | None
    flat: torch.Tensor  # index.view(-1)
    padded: bool  # any padding entry at all (else the mask is all ones and is skipped)

    MAX_PADDING = 2.0  # grouped only while padded entries <= this x real tokens (+ a small constant)

    @classmethod
    def build(cls, routes: Routes, present: frozenset[int], device,
              dtype: torch.dtype = torch.float32) -> "SlotGroups | None":
        lo, hi = min(present), max(present) + 1
        counts = np.bincount(routes.slot - lo, minlength=hi - lo)  # [hi - lo]
        width = int(counts.max())
        if (hi - lo) * width > cls.MAX_PADDING * routes.num_tokens + 64:
            return None
        index = np.zeros((hi - lo, width), dtype=np.int64)
        keep = np.zeros((hi - lo, width), dtype=bool)
        weight = np.zeros((hi - lo, width), dtype=np.float32)
        for g in range(hi - lo):
            members = np.flatnonzero(routes.slot == lo + g)
            index[g, :len(members)] = routes.tok[members]
            keep[g, :len(members)] = True
            weight[g, :len(members)] = routes.scale[members]
        flat = to_device(torch.from_numpy(index), device).view(-1)
        keep = to_device(torch.from_numpy(keep), device).view(-1, 1)
        scaled = not (routes.scale == 1).all()
        weight = to_device(torch.from_numpy(weight).to(dtype), device).view(-1, 1) if scaled else None
        return cls(lo, hi, flat.view(hi - lo, width), keep, weight, flat, int(counts.sum()) != (hi - lo) * width)


class MappingHolder:
    """The one object every wrapped layer shares: the runner sets ``mapping`` before each forward; ``backend``
    (lora_backend.py, chosen at start) computes the deltas. Default: the torch ops.

    Passed explicitly at wrap time (no module-level global), so two engines in one process never collide.
    """

    def __init__(self, backend=None) -> None:
        if backend is None:
            from server.layers.lora_backend import TorchLora  # lora_backend imports this module

            backend = TorchLora()
        self.backend = backend
        self.mapping: AdapterMapping = AdapterMapping()
