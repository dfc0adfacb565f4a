"""Adapter weights on the host: AdapterWeights (a whole adapter: its ModuleWeights, and after prepare_slots the
same tensors stacked as one PackedBank per SlotBank of the device layout, so a slot fill is a few copies).
formats.py builds these from PEFT directories; AdapterWeights.prepare_slots makes them slot-ready. ModuleWeights
and PackedBank are what the slot banks take, so they are defined with them (server/layers/host_weights.py)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from server.layers.host_weights import Alloc, ModuleWeights, PackedBank, empty


@dataclass
class AdapterWeights:
    """A whole adapter on host: ``modules`` maps a base-model module path to its tensors; ``packed`` (after
    ``prepare_slots`` with a bank layout) holds the same tensors stacked per bank, ``modules`` viewing into it."""

    name: str
    peft_type: str  # LORA | ADALORA | IA3
    use_dora: bool
    modules: dict[str, ModuleWeights]
    path: str
    base_model_name_or_path: str | None = None
    config: dict = field(default_factory=dict)
    packed: dict[int, PackedBank] = field(default_factory=dict)  # bank number -> stacked tensors
    # SHA-256 (hex) of the canonical config JSON and the weights (header and bytes): what the adapter computes,
    # whatever it is called; prefix-cache blocks are keyed by it
    content_hash: str = ""
    _nbytes: int | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "dora" if self.use_dora else self.peft_type.lower()

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Host bytes held (packed tensors plus per-module tensors that are not views into them). Computed
        once by prepare_slots, counting the slot-ready B a DoRA module builds at its first activation: the
        host tier sums this over every entry whenever a request finishes, so it must cost nothing."""
        if self._nbytes is None:
            return self._count_bytes()
        return self._nbytes

    def _count_bytes(self) -> int:
        packed = self._packed_tensors()
        spans = _spans(packed)
        own = [t for m in self.modules.values()
               for t in (m.a, m.b, m.slot_b, m.magnitude, m.ia3, m.dora_scale, m.dora_shift)
               if t is not None and not _inside(t, spans)]
        dora_slot_b = sum(m.b.numel() * 4 for m in self.modules.values() if m.magnitude is not None
                          and m.slot_b is None)  # still to come, at first activation
        return sum(t.numel() * t.element_size() for t in packed + own) + dora_slot_b

    def prepare_slots(self, banks: list[list[str]] | None = None, alloc: Alloc | None = None) -> None:
        """Make the adapter slot-ready: B transposed with its scaling folded in, stacked per bank of the
        device layout (``banks``: each bank's member module paths, in bank order) where every targeted member
        of a bank is the same kind (plain LoRA/AdaLoRA, IA3 on the same side, or DoRA). DoRA packs only once
        its factors exist (they need the base weight: ModelRunner.prepare_dora, which calls this again);
        banks already packed are kept. Afterwards no tensor views the file buffer the adapter was read into,
        so that buffer is freed. ``alloc(shape, dtype)`` gives the memory every new tensor is written into
        (default torch.empty; the load worker's shared-memory arena, so nothing is copied again to hand the
        adapter over)."""
        new = alloc or empty
        for number, paths in enumerate(banks or ()):
            if number in self.packed:
                continue
            present = [(pos, p, self.modules[p]) for pos, p in enumerate(paths) if p in self.modules]
            packed = _pack(present, new) if present else None
            if packed is not None:
                self.packed[number] = packed
        spans = _spans(self._packed_tensors())
        for m in self.modules.values():
            if m.a is not None and m.magnitude is None and m.slot_b is None:
                m.slot_b = m.scaled_bt(new)
                m.b = None
            for part in ("a", "b", "magnitude", "ia3"):
                t = getattr(m, part)
                if t is not None and not _inside(t, spans) and \
                        t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    setattr(m, part, new(t.shape, t.dtype).copy_(t))  # a view into the file buffer: own it
        self._nbytes = self._count_bytes()

    def _packed_tensors(self) -> list[torch.Tensor]:
        return [t for p in self.packed.values() for t in (p.a, p.b, p.ia3, p.out_scale, p.out_shift)
                if t is not None]


def _spans(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors]


def _inside(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    """Whether ``t``'s memory lies in one of ``spans`` (a view into a packed tensor). By address, not by
    storage: every tensor of an adapter handed over from the load worker shares the one arena storage."""
    ptr = t.data_ptr()
    return any(start <= ptr < end for start, end in spans)


def _dtype(ts: list[torch.Tensor]) -> torch.dtype:
    """The dtype all of ``ts`` promote to (as torch.stack's own result would be): never a lossy cast."""
    return functools.reduce(torch.promote_types, (t.dtype for t in ts))


def _stack(ts: list[torch.Tensor], alloc: Alloc) -> torch.Tensor:
    """Same-shaped tensors -> a new [n, *shape] in ``alloc``'s memory."""
    return torch.stack(ts, out=alloc((len(ts), *ts[0].shape), _dtype(ts)))


def _stack_rows(ts: list[torch.Tensor], r: int, alloc: Alloc, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[r_i, d] tensors -> a new [n, r, d] (``dtype``, default the one they all promote to), zero rows past
    each r_i (lower ranks from rank_pattern), written straight into ``alloc``'s memory."""
    dtype = dtype or _dtype(ts)
    out = alloc((len(ts), r, ts[0].shape[-1]), dtype)
    if all(t.shape[0] == r and t.dtype == dtype for t in ts):
        return torch.stack(ts, out=out)
    for i, t in enumerate(ts):
        out[i, :t.shape[0]].copy_(t)
        out[i, t.shape[0]:].zero_()
    return out


def _pack(present: list[tuple[int, str, ModuleWeights]], alloc: Alloc) -> PackedBank | None:
    """Stack one bank's modules (a few ops for the whole bank), or None when they are not all one packable kind
    (then the bank is filled layer by layer)."""
    positions = [pos for pos, _, _ in present]
    paths = [path for _, path, _ in present]
    mws = [m for _, _, m in present]
    index = None if positions == list(range(len(positions))) else torch.tensor(positions, dtype=torch.long)
    if all(m.ia3 is not None for m in mws):
        if len({m.ia3_on_input for m in mws}) != 1 or len({m.ia3.shape for m in mws}) != 1:
            return None
        ia3 = _stack([m.ia3 for m in mws], alloc)  # [n, dim]
        for i, m in enumerate(mws):
            m.ia3 = ia3[i]
        return PackedBank(positions, index, [0] * len(mws), ia3=ia3, ia3_on_input=mws[0].ia3_on_input,
                          modules=paths)
    ranks = [m.rank for m in mws]
    r = max(ranks)
    if all(m.a is not None and m.magnitude is None and m.slot_b is None for m in mws):  # LoRA, AdaLoRA
        scalings = {m.scaling for m in mws}
        scale = scalings.pop() if len(scalings) == 1 else torch.tensor([m.scaling for m in mws]).view(-1, 1, 1)
        a = _stack_rows([m.a for m in mws], r, alloc)  # [n, r, in]
        b = _stack_rows([m.b.T for m in mws], r, alloc, torch.float32).mul_(scale)  # [n, r, out]
        pb = PackedBank(positions, index, ranks, a=a, b=b, modules=paths)
        for m, a_i, b_i in zip(mws, *pb.rows()):
            m.a, m.slot_b, m.b = a_i, b_i, None
        return pb
    if all(m.magnitude is not None and m.dora_scale is not None for m in mws) and \
            len({m.dora_shift is None for m in mws}) == 1:  # DoRA with its factors computed
        a = _stack_rows([m.a for m in mws], r, alloc)
        b = _stack_rows([m.slot_b for m in mws], r, alloc)
        scale = _stack([m.dora_scale for m in mws], alloc)  # [n, out]
        shift = None if mws[0].dora_shift is None else _stack([m.dora_shift for m in mws], alloc)
        pb = PackedBank(positions, index, ranks, a=a, b=b, modules=paths, out_scale=scale, out_shift=shift)
        for i, (m, a_i, b_i) in enumerate(zip(mws, *pb.rows())):
            m.a, m.slot_b, m.dora_scale = a_i, b_i, scale[i]
            m.dora_shift = None if shift is None else shift[i]
        return pb
    return None
