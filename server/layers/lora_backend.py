"""LoRA backends: how every wrapped layer adds its adapters' deltas, one object per engine chosen at start
(``--lora-kernel``), like vLLM's PunicaWrapper split by device.

A backend plans each step once (``plan``: the step's Routes -> the AdapterMapping every layer reads) and runs each
layer (``forward``: the base layer with IA3/DoRA scaling, plus the LoRA deltas). Nothing is chosen per call.

    reference  the plain-torch ops of ops.py: two bmm over padded groups when padding is cheap, else a loop over
               (slot, scale) segments (the oracle the others are tested against; what runs where neither
               other backend applies)
    numba   CPU float32: the compiled loop of kernels.py for steps whose runs are short (decode), the torch
            ops for GEMM-shaped ones (long prefill runs); with a LoraWorker, every step with an adapter runs the
            loop on a spare core beside the base GEMM (lora_worker.py)
    triton  CUDA, any float dtype: the shrink/expand kernels of lora_triton.py (BGMV for decode, SGMV for
            prefill); the shrink of layers that share their input and a SlotBank (k/v, gate/up) is one launch
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging

import torch

from server.layers import kernels
from server.layers.lora_worker import LoraWorker
from server.layers.mapping import ALONE_MAX_RUN, AdapterMapping, Routes
from server.layers.ops import lora_grouped_views, lora_segments

log = logging.getLogger(__name__)

# a handoff to the LoRA worker costs ~10 us (lora_worker.py): worth it for every step with runs, even one adapter's
# (measured on SmolLM2, one core each, paired steps: 16 adapters x 2 tokens -8..13% a decode step, 4 x 8 tokens -5%,
# one adapter x 32 tokens -4%, a 16-adapter prefill of 1024 tokens -8%)
SHARE_STEP = 1 / 32  # how fast an overlapped layer's split of the runs between the two threads adapts


class TorchLora:
    name = "reference"

    def __init__(self, dtype: torch.dtype = torch.float32):
        """``dtype``: the slots' (the plan puts the step's scales in it once, for every layer)."""
        self.dtype = dtype

    def plan(self, routes: Routes, num_slots: int, device: torch.device) -> AdapterMapping:
        return AdapterMapping.route(routes, num_slots, device, dtype=self.dtype)

    def forward(self, layer, x2: torch.Tensor, mapping: AdapterMapping) -> torch.Tensor:
        """x2: [num_tokens, in] (IA3 input scaling applied) -> y: [num_tokens, out]."""
        y = layer.base_out(x2, mapping)
        self.add(layer, y, x2, mapping)
        return y

    def add(self, layer, y: torch.Tensor, x2: torch.Tensor, mapping: AdapterMapping) -> None:
        """y += every route's scale x its slot's delta, in place."""
        groups = mapping.groups
        if groups is None:
            lora_segments(y, x2, layer.lora_a, layer.lora_b, layer.ranks, mapping.segments, layer.slot_views)
            return
        rank = mapping.live_ranks(layer.bank)[layer.position]
        if rank:
            lora_grouped_views(y, x2, *layer.range_views(groups.lo, groups.hi, rank), groups)


class NumbaLora(TorchLora):
    name = "numba"

    def __init__(self, max_run: int, worker: LoraWorker | None = None):
        super().__init__(torch.float32)
        self.max_run = max_run
        self.worker = worker
        self._share: dict[int, float] = {}  # per layer: the share of an overlapped step's runs the worker takes

    def plan(self, routes: Routes, num_slots: int, device: torch.device) -> AdapterMapping:
        # with a worker, one adapter's run goes to it too (its addmm would run here, after the GEMM)
        alone = self.max_run if self.worker is not None else ALONE_MAX_RUN
        mapping = AdapterMapping.route(routes, num_slots, device, self.max_run, alone_max_run=alone)
        if self.worker is not None and mapping.runs is not None:
            mapping = dataclasses.replace(mapping, overlap=self.worker)
        return mapping

    def forward(self, layer, x2: torch.Tensor, mapping: AdapterMapping) -> torch.Tensor:
        if mapping.overlap is not None:
            return self._overlapped(layer, x2.contiguous(), mapping)
        return super().forward(layer, x2, mapping)

    def add(self, layer, y: torch.Tensor, x2: torch.Tensor, mapping: AdapterMapping) -> None:
        if mapping.runs is None:  # GEMM-shaped runs: torch's ops are faster
            super().add(layer, y, x2, mapping)
        else:
            kernels.lora_runs(y, x2.contiguous(), *layer.numpy_slots, layer.ranks, mapping.runs)

    def _overlapped(self, layer, x2: torch.Tensor, mapping: AdapterMapping) -> torch.Tensor:
        """Two cores: the worker computes the first share of the runs into ``delta`` while this thread runs the
        base GEMM and then the remaining runs into ``y``. The share adapts per layer (SHARE_STEP a call) so both
        tend to finish together: up when the worker was done first, down when this thread had to wait."""
        share = self._share.get(id(layer), 1.0)
        count = max(1, round(share * len(mapping.runs.slots)))
        _, here = mapping.runs.split(count)
        delta = torch.empty(x2.shape[0], layer.out_features)  # [num_tokens, out]: the worker zeroes it first
        self.worker.submit(delta, x2, *layer.numpy_slots, layer.ranks, mapping.runs, count)
        try:
            y = layer.base_out(x2, mapping).contiguous()
            if here is not None:
                kernels.lora_runs(y, x2, *layer.numpy_slots, layer.ranks, here)
        finally:
            first = self.worker.finished()
            self.worker.wait()  # takes the job back if the worker has not started it
        self._share[id(layer)] = min(1.0, share + SHARE_STEP) if first else max(0.0, share - SHARE_STEP)
        return y.add_(delta)


def triton_usable(device: torch.device) -> bool:
    """Triton installed and able to run on ``device`` (CUDA; CPU only under its interpreter)."""
    try:
        from server.layers import lora_triton
    except ImportError:
        return False
    return lora_triton.usable(device)


def choose(kernel: str, overlap: str, device: torch.device, dtype: torch.dtype, threads: int,
           cores: int) -> TorchLora:
    """The backend for --lora-kernel and --lora-overlap. auto: triton on CUDA with triton installed; numba for
    float32 on CPU with numba installed (compiled here, before the first request); else the reference ops.
    The worker when a core is left beside ``threads``."""
    if kernel == "triton" or (kernel == "auto" and device.type == "cuda" and triton_usable(device)):
        if not triton_usable(device):
            raise ValueError(f"--lora-kernel triton needs a CUDA device and the triton package (here: {device}, "
                             "triton " + ("installed" if importlib.util.find_spec("triton") else "missing") +
                             "); use --lora-kernel auto or reference")
        _no_overlap(overlap)
        log.info("LoRA kernel: triton (BGMV for decode steps, SGMV for prefill)")
        return TritonLora()
    usable = device.type == "cpu" and dtype == torch.float32 and kernels.available()
    if kernel == "numba" and not usable:
        raise ValueError("--lora-kernel numba needs float32 on CPU and the numba package "
                         f"(here: {dtype} on {device}, numba {'installed' if kernels.available() else 'missing'}); "
                         "use --lora-kernel auto or reference")
    if kernel == "reference" or not usable:
        _no_overlap(overlap)
        return TorchLora(dtype)
    kernels.warm_up()
    max_run = kernels.max_run(threads)
    log.info("LoRA kernel: numba (compiled CPU loop) for steps with up to %d tokens per adapter (%d torch threads); "
             "torch ops for longer runs", max_run, threads)
    worker = None
    if overlap == "on" or (overlap == "auto" and cores > threads):
        log.info("LoRA overlap: steps with an adapter run the loop on a spare core beside the base GEMM")
        worker = LoraWorker()
    return NumbaLora(max_run, worker)


def _no_overlap(overlap: str) -> None:
    if overlap == "on":
        raise ValueError("--lora-overlap on needs the compiled CPU LoRA kernel (--lora-kernel numba or auto on "
                         "a float32 CPU model)")


# layers that read one input (the attention projections, the MLP's gate and up): when they share a SlotBank
# (k/v under GQA, gate/up always) their shrink is one launch for all of them
SAME_INPUT = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"}, {"w1", "w3"})


class TritonLora(TorchLora):
    """The Triton kernels (lora_triton.py) for every step. A layer whose SlotBank neighbours take the same input
    (``SAME_INPUT``: consecutive bank members under one parent module) runs the shrink for all of them at its
    call and leaves the others theirs; a neighbour uses it only when it is handed the very same input tensor,
    unmodified, in the same step, and otherwise computes its own, so the fusion can never change a result."""

    name = "triton"

    def __init__(self):
        self._groups: dict[int, tuple[int, int, int]] = {}  # id(layer) -> (first bank position, members, own index)
        self._shrunk: tuple | None = None  # (plan, bank, first, x, version, rank, h) of the last fused shrink

    def plan(self, routes: Routes, num_slots: int, device: torch.device) -> AdapterMapping:
        from server.layers.lora_triton import TritonPlan

        self._shrunk = None
        present = frozenset(routes.slot.tolist())
        if not present:
            return AdapterMapping()
        # only what the layers read besides the kernels' plan (IA3/DoRA scale rows): no segments or groups
        return AdapterMapping(scale_index=AdapterMapping.scale_index_of(routes, num_slots, device), slots=present,
                              triton=TritonPlan.build(routes, device))

    def add(self, layer, y: torch.Tensor, x2: torch.Tensor, mapping: AdapterMapping) -> None:
        from server.layers import lora_triton

        plan = mapping.triton
        first, count, own = self._group(layer)
        h, rank = self._reuse(plan, layer.bank, first, x2)
        if h is None:
            rank = max(mapping.live_ranks(layer.bank)[first:first + count])
            if not rank:
                return
            h = lora_triton.shrink(x2, layer.bank.lora_a[first:first + count], plan, rank)
            if count > 1:
                self._shrunk = (plan, layer.bank, first, x2, _version(x2), rank, h)
        lora_triton.expand(y, h[own], layer.lora_b, plan, rank)

    def _reuse(self, plan, bank, first: int, x2: torch.Tensor):
        """(h, rank) of the fused shrink this layer's group already ran on this very input, else (None, 0)."""
        done = self._shrunk
        if (done is not None and done[0] is plan and done[1] is bank and done[2] == first
                and _same_tensor(done[3], x2) and done[4] == _version(x2)):
            return done[6], done[5]
        return None, 0

    def _group(self, layer) -> tuple[int, int, int]:
        """(first bank position, member count, this layer's index) of the layer's same-input neighbours."""
        group = self._groups.get(id(layer))
        if group is None:
            group = self._groups[id(layer)] = _same_input_group(layer)
        return group


def _version(t: torch.Tensor) -> int:
    """The in-place write counter; inference-mode tensors keep none (-1): for them the held reference (the memory
    cannot be reused while it lives) and the model's code (no projection writes its input) are the guarantee."""
    return -1 if t.is_inference() else t._version


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


def _same_input_group(layer) -> tuple[int, int, int]:
    bank = layer.bank
    pos = bank.layers.index(layer)
    parent, _, child = bank.paths[pos].rpartition(".") if bank.paths else ("", "", "")
    family = next((f for f in SAME_INPUT if child in f), None)
    if family is None:
        return pos, 1, 0

    def sibling(p: int) -> bool:
        other_parent, _, other = bank.paths[p].rpartition(".")
        return other_parent == parent and other in family

    lo = pos
    while lo > 0 and sibling(lo - 1):
        lo -= 1
    hi = pos + 1
    while hi < len(bank.paths) and sibling(hi):
        hi += 1
    return lo, hi - lo, pos - lo
