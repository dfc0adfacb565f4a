"""The host-side tensors the slot banks take: ModuleWeights (one targeted module, as PEFT stores it, plus the
slot-ready caches the layers fill from) and PackedBank (one adapter's modules stacked per SlotBank, so a slot fill
is a few copies). They are the layers' input types, so they live here: adapters/ (formats.py reads them from PEFT
directories, weights.AdapterWeights groups and packs them) imports this package, never the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Alloc = Callable[[tuple, torch.dtype], torch.Tensor]  # (shape, dtype) -> a new uninitialised tensor


def empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


@dataclass
class ModuleWeights:
    """One targeted linear module's adapter tensors, on host, as PEFT stores them.

    LoRA family: a [r, in], b [out, r], delta = scaling * b @ a @ x; DoRA adds magnitude [out].
    IA3: ia3 [out] scales the output, or [in] scales the input when ``ia3_on_input`` (feedforward_modules).
    """

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scaling: float = 1.0
    magnitude: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    ia3_on_input: bool = False
    dora_scale: torch.Tensor | None = None  # m / ||W + s*B@A|| [out], from the base weight (AdapterLinear.prepare_dora)
    dora_shift: torch.Tensor | None = None  # bias * (1 - dora_scale) [out], when the base layer has a bias
    slot_b: torch.Tensor | None = None  # [r, out] B.T with scaling (and DoRA's d) folded in, cached likewise

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[0]

    def scaled_bt(self, alloc: Alloc = empty) -> torch.Tensor:
        """B transposed with the scaling folded in, [r, out] float32 in ``alloc``'s memory: what a slot's
        lora_b row block holds (times DoRA's d for DoRA)."""
        return alloc((self.rank, self.b.shape[0]), torch.float32).copy_(self.b.T).mul_(self.scaling)


@dataclass
class PackedBank:
    """One adapter's tensors for one bank of same-shaped base layers (see server.layers.slot_bank), stacked so
    a device-slot fill is one copy per tensor kind for the whole bank, not one per layer.

    positions: the bank members this adapter targets (indices into the bank's layer list), ascending.
    index:     the same as a long tensor, or None when the adapter targets every member in order.
    ranks:     each targeted member's own rank (rows up to ``a.shape[1]`` beyond it are zero).
    a [n, r, in], b [n, r, out] (B transposed, scaling folded in): LoRA/AdaLoRA; ia3 [n, dim]: IA3.
    DoRA adds out_scale [n, out] (its d, also folded into b) and out_shift [n, out] (bias * (1 - d)).
    """

    positions: list[int]
    index: torch.Tensor | None
    ranks: list[int]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    ia3_on_input: bool = False
    modules: list[str] = field(default_factory=list)  # the module path of each position
    out_scale: torch.Tensor | None = None
    out_shift: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[1]

    def rows(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each member's own A [r_i, in] and B [r_i, out]: views, made by one unbind per tensor (indexing each
        is ~3x the Python, and the server builds these on the loader thread, beside the step thread's GIL)."""
        out = []
        for t in (self.a, self.b):
            rows = t.unbind(0)
            out.append([row if r == t.shape[1] else row[:r] for row, r in zip(rows, self.ranks)])
        return out[0], out[1]
