"""LoRA backends: how every wrapped layer adds its adapters' deltas, one object per engine chosen at start
(``--lora-kernel``), like vLLM's PunicaWrapper split by device.

A backend plans each step once (``plan``: the step's Routes -> the AdapterMapping every layer reads) and runs each
layer (``forward``: the base layer with IA3/DoRA scaling, plus the LoRA deltas). Nothing is chosen per call.

    torch   the plain-torch ops of ops.py: two bmm over padded groups when padding is cheap, else a loop over
            (slot, scale) segments (the reference the others are tested against; GPUs and non-float32 use it)
    numba   CPU float32: the compiled loop of kernels.py for steps whose runs are short (decode), the torch
            ops for GEMM-shaped ones (long prefill runs); with a LoraWorker, steps with many adapters run the
            loop on a spare core beside the base GEMM (lora_worker.py)
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from server.layers import kernels
from server.layers.lora_worker import LoraWorker
from server.layers.mapping import AdapterMapping, Routes
from server.layers.ops import lora_grouped_views, lora_segments

log = logging.getLogger(__name__)

# a handoff to the LoRA worker costs ~30-50 us a layer: worth it once a step's LoRA work is a sizeable share of the
# layer (measured on SmolLM2, one core each: 64 adapters x 1 token -21% a step; 16 x 2 tokens no gain)
OVERLAP_MIN_RUNS = 24
SHARE_STEP = 1 / 32  # how fast an overlapped layer's split of the runs between the two threads adapts


class TorchLora:
    name = "torch"

    def plan(self, routes: Routes, num_slots: int, device: torch.device) -> AdapterMapping:
        return AdapterMapping.route(routes, num_slots, device)

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
        rank = max(layer.ranks[groups.lo:groups.hi])
        if rank:
            lora_grouped_views(y, x2, *layer.range_views(groups.lo, groups.hi, rank), groups)


class NumbaLora(TorchLora):
    name = "numba"

    def __init__(self, max_run: int, worker: LoraWorker | None = None):
        self.max_run = max_run
        self.worker = worker
        self._share: dict[int, float] = {}  # per layer: the share of an overlapped step's runs the worker takes

    def plan(self, routes: Routes, num_slots: int, device: torch.device) -> AdapterMapping:
        mapping = AdapterMapping.route(routes, num_slots, device, self.max_run)
        if self.worker is not None and mapping.runs is not None and len(mapping.runs.slots) >= OVERLAP_MIN_RUNS:
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
        ahead, here = mapping.runs.split(max(1, round(share * len(mapping.runs.slots))))
        delta = torch.zeros(x2.shape[0], layer.out_features)  # [num_tokens, out]: only the worker's rows change
        self.worker.submit(kernels.lora_runs, delta, x2, *layer.numpy_slots, layer.ranks, ahead)
        try:
            y = layer.base_out(x2, mapping).contiguous()
            if here is not None:
                kernels.lora_runs(y, x2, *layer.numpy_slots, layer.ranks, here)
        finally:
            first = self.worker.finished()
            self.worker.wait()
        self._share[id(layer)] = min(1.0, share + SHARE_STEP) if first else max(0.0, share - SHARE_STEP)
        return y.add_(delta)


def choose(kernel: str, overlap: str, device: torch.device, dtype: torch.dtype, threads: int,
           cores: int) -> TorchLora:
    """The backend for --lora-kernel and --lora-overlap: numba for float32 on CPU with numba installed (compiled
    here, before the first request), else torch; the worker when a core is left beside ``threads``."""
    usable = device.type == "cpu" and dtype == torch.float32 and kernels.available()
    if kernel == "numba" and not usable:
        raise ValueError("--lora-kernel numba needs float32 on CPU and the numba package "
                         f"(here: {dtype} on {device}, numba {'installed' if kernels.available() else 'missing'}); "
                         "use --lora-kernel auto or torch")
    if kernel == "torch" or not usable:
        if overlap == "on":
            raise ValueError("--lora-overlap on needs the compiled CPU LoRA kernel (--lora-kernel numba or auto on "
                             "a float32 CPU model)")
        return TorchLora()
    kernels.warm_up()
    max_run = kernels.max_run(threads)
    log.info("LoRA kernel: numba (compiled CPU loop) for steps with up to %d tokens per adapter (%d torch threads); "
             "torch ops for longer runs", max_run, threads)
    worker = None
    if overlap == "on" or (overlap == "auto" and cores > threads):
        log.info("LoRA overlap: steps with >= %d adapters run the loop on a spare core beside the base GEMM",
                 OVERLAP_MIN_RUNS)
        worker = LoraWorker()
    return NumbaLora(max_run, worker)
