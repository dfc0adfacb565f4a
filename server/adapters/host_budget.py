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
import os
import threading
import time
from pathlib import Path
from typing import Callable

from server.adapters.adapter_dir import AdapterDir
from server.adapters.formats import DTYPES, WEIGHTS_FILE, check_safetensors_header
from server.errors import AdapterError, HostMemoryFullError, NotReadyError

Held = Callable[[int], int]  # held(need): the bytes held after evicting what may go to make room for need more


def packed_bytes(header: dict) -> int:
    """The host bytes an adapter will take once packed, from its safetensors header alone (before reading):
    A and IA3 vectors as stored, B as float32 (packing folds the scaling in at float32), AdaLoRA's E folded into
    A, DoRA's magnitude plus its scale and bias shift in float32. Exact for a file of one dtype; rank padding
    (rank_pattern) or mixed dtypes can exceed it, so a load settles on its true size once read."""
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        numel, itemsize = math.prod(info["shape"]), DTYPES[info["dtype"]].itemsize
        if ".lora_B" in key:
            total += numel * max(4, itemsize)
        elif "lora_magnitude_vector" in key:
            total += numel * (itemsize + 8)
        elif ".lora_E" not in key:
            total += numel * itemsize
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

    def estimate(self, directory: Path, roots: list[Path] | None, max_file_bytes: int) -> int:
        """The bytes to reserve before reading ``directory`` (packed_bytes of its header, opened as the read
        will be: AdapterDir), at most the whole budget; 0 when the read will refuse it anyway. AdapterError
        (400) at once for tensor data larger than the whole budget."""
        try:
            opened = AdapterDir(directory, roots)
        except OSError:
            return 0  # the read says what is wrong with the directory
        with opened:
            f = opened.open(WEIGHTS_FILE)
            if f is None:
                return 0  # the read says what is missing
            with f:
                header, start = check_safetensors_header(f, directory / WEIGHTS_FILE, max_file_bytes)
                data = os.fstat(f.fileno()).st_size - start
        self.check_fits(data, str(directory / WEIGHTS_FILE))
        return min(packed_bytes(header), self.max_bytes)

    def reserve(self, nbytes: int, deadline: float, held: Held, what: str) -> None:
        """Reserve ``nbytes``, waiting until ``deadline`` (time.monotonic) for room; ``held`` is called with the
        lock held. HostMemoryFullError (503) when the deadline passes first."""
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

    def settle(self, reserved: int, actual: int, deadline: float, held: Held, what: str) -> int:
        """A load reserved ``reserved`` bytes and turned out to hold ``actual``: reserve the difference (waiting
        as reserve does) or give back the excess. Returns the reservation now held: ``actual``."""
        self.check_fits(actual, what)
        if actual > reserved:
            self.reserve(actual - reserved, deadline, held, what)
        else:
            self.release(reserved - actual)
        return actual

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
