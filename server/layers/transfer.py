"""Host -> device copies that do not wait for the device.

A plain ``tensor.to("cuda")`` from pageable memory synchronises the host with the stream (torch waits for the
copy, so for every kernel queued before it): a step that builds its plans with a handful of them waits on the
GPU a handful of times. Staged through pinned memory and issued non-blocking, the copy is queued in order on
the current stream and the host goes on; torch's caching host allocator keeps the pinned block until the copy
has run. On a CPU (or the meta device) it is the plain ``to``.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` (on the host) on ``device``, without a host-device sync on CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
