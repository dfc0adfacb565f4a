"""HostBudget: the host tier's byte budget (--max-cpu-lora-bytes), made hard.

Adapters with requests in flight can never be evicted, so a budget enforced only by eviction is soft: a burst of
distinct on-demand adapters would all sit in memory at once. Instead a load reserves its bytes *before* it reads
anything; while the held bytes (host tier, unloaded adapters still serving, the reservation) leave no room, it
waits, up to --cpu-lora-wait seconds, for requests to finish and free some, then gives up with 503 and
Retry-After. So at every moment: held + reserved <= max_bytes.

The waiting happens on the store's loader thread only; the step thread never blocks here (it only notifies).
"""
from __future__ import annotations

import math
import threading
import time
from typing import Callable

from server.adapters.formats import DTYPES
from server.errors import AdapterError, HostMemoryFullError, NotReadyError


def estimate(header: dict) -> int:
    """The host bytes an adapter will take once packed, from its safetensors header alone (before reading):
    every tensor at float32 or wider (packing turns LoRA B into float32 and keeps the rest), DoRA's magnitude
    twice more (its scale and bias shift). Rank padding (rank_pattern) can exceed it: the load settles on its
    true size once read."""
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel = math.prod(info["shape"])
        total += numel * max(4, DTYPES[info["dtype"]].itemsize) * (3 if "lora_magnitude_vector" in key else 1)
    return total


class HostBudget:
    def __init__(self, max_bytes: int, wait_s: float, lock: threading.RLock):
        """lock: the store's lock, which guards everything the held bytes are computed from."""
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        self.reserved = 0  # promised to the load in progress, not yet in the host tier
        self.changed = threading.Condition(lock)
        self.closed = False

    def deadline(self) -> float:
        return time.monotonic() + self.wait_s

    def check_fits(self, nbytes: int, what: str) -> None:
        """An adapter of ``nbytes`` could never fit: AdapterError (400) at once, no waiting."""
        if nbytes > self.max_bytes:
            raise AdapterError(f"{what}: needs {nbytes} bytes of host memory, more than the whole host adapter "
                               f"budget (--max-cpu-lora-bytes {self.max_bytes}); raise it or use a smaller adapter")

    def reserve(self, nbytes: int, deadline: float, held: Callable[[int], int], what: str) -> None:
        """Reserve ``nbytes``, waiting until ``deadline`` (time.monotonic) for room. ``held(need)`` returns the
        bytes held after evicting what it may to make room for ``need`` more (called with the lock held)."""
        with self.changed:
            while held(self.reserved + nbytes) + self.reserved + nbytes > self.max_bytes:
                left = deadline - time.monotonic()
                if self.closed:
                    raise NotReadyError("the server is shutting down")
                if left <= 0:
                    raise HostMemoryFullError(
                        f"{what}: no room for {nbytes} more bytes of host memory within {self.wait_s:g} s: "
                        f"--max-cpu-lora-bytes ({self.max_bytes}) is held by adapters with requests in flight; "
                        f"retry shortly, or raise --max-cpu-lora-bytes or --cpu-lora-wait")
                self.changed.wait(left)
            self.reserved += nbytes

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` of the reservation (the load failed, or needed less, or is in the tier now)."""
        with self.changed:
            self.reserved -= nbytes
            self.changed.notify_all()

    def freed(self) -> None:
        """Held bytes may have become free (a request finished, an adapter was unloaded): wake the waiter."""
        with self.changed:
            self.changed.notify_all()

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
