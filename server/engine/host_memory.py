"""Host memory for a CPU engine: page faults are a real share of a step on a virtual machine.

Every first write to a 4 KiB page the process has not touched costs a page fault (measured on the 2-CPU
Firecracker VM the benchmarks run on: ~6 us each, 1.5 s to touch 1 GiB). Two things made a step touch fresh
pages over and over:

- glibc returns freed memory to the kernel: a temporary above its mmap threshold is unmapped when freed, and the
  heap's free top is trimmed, so the next step's activations fault their pages in again. One 1024-token prefill
  of SmolLM2 took ~150,000 faults, ~15% of the step. ``keep_freed_heap`` raises both thresholds so freed memory
  stays in the process for the next step (what vLLM gets on CPU by preloading tcmalloc).
- the paged KV pool was reserved, not touched: every block's first write faulted (7% of a prefill step until the
  free queue had gone round the whole pool). ``populate`` makes a tensor's pages resident, with
  madvise(MADV_POPULATE_WRITE) (Linux 5.14+; in POPULATE_CHUNK calls, see there), or by zeroing it where that call
  is missing (what vLLM and llama.cpp do with their KV caches). It costs 0.4 s per GiB here where the VM has
  backed that memory before and ~2.7 s per GiB where it has not (a fresh VM: 11 s for the default 4 GiB pool), so
  the runner calls ``populate_in_background``: the server starts at once and the pages become resident on a daemon
  thread.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): bigger blocks are mapped anyway
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: in effect, never trim
MADV_POPULATE_WRITE = 23  # linux/mman.h, Linux 5.14+
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# madvise holds the process's mmap lock (read) for the whole range it populates, and anything that maps memory
# (a large malloc, a thread's stack, loading a library) waits for it: one call over the 4 GiB pool stalled the
# server's start-up warm-up for the whole ~11 s, and a 40 MiB allocation beside a 2 GiB populate waited 6.7 s.
# In 16 MiB calls that allocation waited at most 0.1-0.17 s (64 MiB calls: 0.4-0.7 s).
POPULATE_CHUNK = 16 << 20

_libc = None
_kept = False


def _c_library():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(None, use_errno=True)  # the malloc this process uses (a preloaded one included)
        except OSError:
            _libc = False
        else:
            if hasattr(_libc, "madvise"):
                _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc or None


def keep_freed_heap() -> bool:
    """Make the C allocator keep freed memory for reuse instead of handing it back to the kernel (process-wide,
    once). Skipped where the user tuned it already (GLIBC_TUNABLES or MALLOC_*_ in the environment) or it is not
    glibc's. The cost: the process holds on to its peak heap, as a server with tcmalloc does."""
    global _kept
    if _kept:
        return True
    tuned = [k for k in os.environ if k == "GLIBC_TUNABLES" or (k.startswith("MALLOC_") and k.endswith("_"))]
    libc = _c_library()
    if tuned or libc is None or not hasattr(libc, "mallopt"):
        log.info("host allocator: left as it is (%s)", f"{tuned[0]} is set" if tuned else "no glibc mallopt")
        return False
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        log.info("host allocator: mallopt refused the thresholds; left as it is")
        return False
    _kept = True
    log.info("host allocator: freed memory kept for reuse (mmap threshold %d MiB, no trimming): no page faults "
             "on each step's temporaries", MMAP_THRESHOLD >> 20)
    return True


def populate(tensors: list) -> str:
    """Make every page of ``tensors`` (CPU, contiguous) resident now. Returns how: "madvise" or "zeroed" (the
    contents are then zero; a populated tensor keeps its contents)."""
    libc = _c_library()
    if libc is not None and hasattr(libc, "madvise"):
        if all(_populate_one(libc, t) for t in tensors):
            return "madvise"
    for t in tensors:
        t.zero_()
    return "zeroed"


def populate_in_background(tensors: list, what: str) -> threading.Event:
    """``populate`` on a daemon thread; the returned event is set once every page is resident. madvise never
    changes contents, so the caller may write the tensors meanwhile (a page it writes first faults, as it would
    have without this). Zeroing would not be safe beside writers: where madvise cannot do it (probed on the
    first tensor's first page, here) the tensors are zeroed before this returns, and the event is set."""
    done = threading.Event()
    libc = _c_library()
    tensors = [t for t in tensors if t.numel()]
    if not tensors or libc is None or not hasattr(libc, "madvise") or not _populate_one(libc, tensors[0][:1]):
        start = time.perf_counter()
        how = populate(tensors)
        log.info("%s made resident (%s) in %.1fs", what, how, time.perf_counter() - start)
        done.set()
        return done

    def work() -> None:
        start = time.perf_counter()
        try:
            ok = all(_populate_one(libc, t) for t in tensors)
            log.info("%s %s in %.1fs, in the background", what, "made resident (madvise)" if ok else
                     "partly resident: madvise stopped, the rest faults in on first write", time.perf_counter() - start)
        finally:
            done.set()

    threading.Thread(target=work, name="populate", daemon=True).start()
    return done


def _populate_one(libc, t) -> bool:
    """True when ``t``'s pages are resident after the call; False where madvise cannot do it (not CPU memory, not
    one contiguous span, or the kernel refused), and the caller zeroes instead."""
    if t.numel() == 0:
        return True
    if t.device.type != "cpu" or not t.is_contiguous():
        return False
    start = t.data_ptr() // PAGE * PAGE
    end = t.data_ptr() + t.numel() * t.element_size()
    for at in range(start, end, POPULATE_CHUNK):  # one call holds the process's mmap lock: see POPULATE_CHUNK
        if libc.madvise(ctypes.c_void_p(at), min(POPULATE_CHUNK, end - at), MADV_POPULATE_WRITE) != 0:
            return False
    return True
