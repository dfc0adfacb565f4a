"""AdapterMapping: which device slot each token of one forward step uses.

Built once per step by the AdapterManager and read by every wrapped layer, so the per-layer work is a few
tensor ops, never Python bookkeeping over rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

NO_SLOT = -1  # a row that runs the plain base model
# a step on one slot alone has a no-gather addmm path (segments ((slot, None),)) that the kernel only beats
# on short runs: 3.4 vs 4.4 ms at 16 tokens, even at 32, behind at 64 (one thread)
ALONE_MAX_RUN = 16


@dataclass(frozen=True)
class AdapterMapping:
    """Per-step routing of the flat batch's tokens to adapter slots.

    segments:     ((slot, token_index [n_slot] | None), ...) one entry per distinct slot in the step;
                  token_index None means "every token" (the whole step uses one slot).
    scale_index:  [num_tokens] long, the row of each token into a layer's scale tables (``slot``, or the
                  identity row ``num_slots`` for base rows); None when no token uses a slot.
    slots:        the distinct slots present, for layers to decide cheaply what applies.
    groups:       the same routing as one padded batch, for the grouped (bmm) op, or None when padding
                  would waste too much (skewed prefill) and the per-segment loop is cheaper.
    runs:         the same routing as runs of tokens per slot, for the compiled CPU kernel
                  (kernels.lora_runs); set only when the caller asked for it and no run is longer than
                  ``max_run``. Layers take runs first, then groups, then segments.
    """

    segments: tuple[tuple[int, torch.Tensor | None], ...] = ()
    scale_index: torch.Tensor | None = None
    slots: frozenset[int] = field(default_factory=frozenset)
    groups: "SlotGroups | None" = None
    runs: "SlotRuns | None" = None
    overlap: "object | None" = None  # a LoraWorker that computes ``runs`` beside the base GEMM (large steps only)

    @property
    def empty(self) -> bool:
        return not self.slots

    @classmethod
    def build(cls, token_slots, num_slots: int, device: torch.device | str = "cpu",
              max_run: int = 0) -> "AdapterMapping":
        """token_slots: one slot (or NO_SLOT) per token of the step's flat batch ([num_tokens], any int
        sequence). ``max_run`` > 0 asks for ``runs`` (CPU only)."""
        tokens = np.asarray(token_slots, dtype=np.int64)  # [num_tokens]
        present = frozenset(int(s) for s in np.unique(tokens) if s != NO_SLOT)
        if not present:
            return cls()
        if len(present) == 1 and tokens[0] != NO_SLOT and (tokens == tokens[0]).all():  # one adapter: no gathers
            slot = int(tokens[0])
            index = torch.full((len(tokens),), slot, dtype=torch.long, device=device)
            runs = SlotRuns.build(tokens, min(max_run, ALONE_MAX_RUN)) if max_run else None
            return cls(((slot, None),), index, present, runs=runs)
        runs = SlotRuns.build(tokens, max_run) if max_run else None
        t = torch.from_numpy(tokens)
        segments = tuple((slot, torch.nonzero(t == slot).flatten().to(device)) for slot in sorted(present))
        scale_index = torch.where(t == NO_SLOT, num_slots, t).to(device)
        groups = None if runs is not None else SlotGroups.build(t, present, device)
        return cls(segments, scale_index, present, groups, runs)


@dataclass(frozen=True)
class SlotRuns:
    """The step's adapter tokens as runs, one per slot present, for kernels.lora_runs (numpy, CPU).

    order:   [num_adapter_tokens] int64 token indices, slot by slot (ascending slot, then token)
    starts:  [num_runs + 1] int64; run j is order[starts[j]:starts[j + 1]]
    slots:   [num_runs] int64, the slot of run j
    """

    order: np.ndarray
    starts: np.ndarray
    slots: np.ndarray

    @classmethod
    def build(cls, tokens: np.ndarray, max_run: int) -> "SlotRuns | None":
        """tokens: [num_tokens] int64 slot per token. None when some slot has more than ``max_run`` tokens
        (GEMM-shaped: torch's path is faster)."""
        live = np.flatnonzero(tokens != NO_SLOT)
        order = live[np.argsort(tokens[live], kind="stable")]
        slots, counts = np.unique(tokens[order], return_counts=True)
        if counts.max() > max_run:
            return None
        starts = np.zeros(len(slots) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return cls(order.astype(np.int64), starts, slots.astype(np.int64))

    def split(self, k: int) -> tuple["SlotRuns", "SlotRuns | None"]:
        """Runs [0, k) and [k, n) as two SlotRuns over the same ``order`` (views, no copy); None for an empty
        second part."""
        n = len(self.slots)
        second = None if k >= n else SlotRuns(self.order, self.starts[k:], self.slots[k:])
        return SlotRuns(self.order, self.starts[:k + 1], self.slots[:k]), second


@dataclass(frozen=True)
class SlotGroups:
    """Tokens grouped by slot and padded, so a layer applies k adapters with two bmm calls, not k loops.

    lo, hi:  the slot range [lo, hi) covered (slots in it that the step does not use get empty groups).
    index:   [hi - lo, width] token indices, group g holding slot lo + g's tokens; padding points at token 0.
    keep:    [(hi - lo) * width, 1] bool, True for real entries; the op selects on it, so padding adds exactly 0
             to token 0 even when a padded slot holds NaN or Inf.
    flat:    index as [(hi - lo) * width]; padded: whether any entry is padding.
    """

    lo: int
    hi: int
    index: torch.Tensor
    keep: torch.Tensor
    flat: torch.Tensor  # index.view(-1)
    padded: bool  # any padding entry at all (else the mask is all ones and is skipped)

    MAX_PADDING = 2.0  # grouped only while padded entries <= this x real tokens (+ a small constant)

    @classmethod
    def build(cls, tokens: torch.Tensor, present: frozenset[int], device) -> "SlotGroups | None":
        lo, hi = min(present), max(present) + 1
        counts = torch.bincount(tokens[tokens != NO_SLOT] - lo, minlength=hi - lo)  # [hi - lo]
        width = int(counts.max())
        if (hi - lo) * width > cls.MAX_PADDING * len(tokens) + 64:
            return None
        index = torch.zeros(hi - lo, width, dtype=torch.long)
        keep = torch.zeros(hi - lo, width, dtype=torch.bool)
        for g in range(hi - lo):
            members = torch.nonzero(tokens == lo + g).flatten()
            index[g, :len(members)] = members
            keep[g, :len(members)] = True
        index = index.to(device)
        return cls(lo, hi, index, keep.view(-1, 1).to(device), index.view(-1),
                   int(counts.sum()) != (hi - lo) * width)


class MappingHolder:
    """The one object every wrapped layer shares; the runner sets ``mapping`` before each forward.

    Passed explicitly at wrap time (no module-level global), so two engines in one process never collide.
    """

    def __init__(self) -> None:
        self.mapping: AdapterMapping = AdapterMapping()
