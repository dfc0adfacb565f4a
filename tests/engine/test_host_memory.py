"""host_memory: the KV pool made resident at start, and freed heap kept for the next step (counted in page faults,
never timed)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from server.engine import host_memory

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def write_faults(t: torch.Tensor) -> int:
    before = faults()
    t.fill_(1.0)
    return faults() - before


def pages(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() // host_memory.PAGE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults counted through Linux getrusage")
def test_populated_tensor_writes_without_page_faults_and_keeps_its_contents():
    control = torch.empty(64 * MIB // 4)  # above any mmap threshold: fresh pages from the kernel
    assert write_faults(control) > 0.9 * pages(control)  # untouched pages fault on first write
    t = torch.empty(64 * MIB // 4)
    t[:1000] = torch.arange(1000, dtype=torch.float32)
    how = host_memory.populate([t])
    assert how in ("madvise", "zeroed")
    if how == "madvise":
        assert torch.equal(t[:1000], torch.arange(1000, dtype=torch.float32))
    assert write_faults(t) < 0.02 * pages(t)


def test_populate_without_madvise_zeroes(monkeypatch):
    monkeypatch.setattr(host_memory, "_c_library", lambda: None)
    t = torch.full((1000,), 7.0)
    assert host_memory.populate([t, torch.empty(0)]) == "zeroed"
    assert not t.any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page faults counted through Linux getrusage")
def test_background_populate_leaves_concurrent_writes_alone_and_ends_resident():
    """The runner's way: the caller goes on while a daemon thread populates; what it writes meanwhile stays."""
    t = torch.empty(64 * MIB // 4)
    done = host_memory.populate_in_background([t, torch.empty(0)], "test pool")
    marks = torch.arange(1000, dtype=torch.float32)
    for at in (0, t.numel() // 2, t.numel() - 1000):  # past the page the synchronous probe populated: these race
        t[at:at + 1000] = marks  # the thread; madvise never changes contents
    assert done.wait(60)
    for at in (0, t.numel() // 2, t.numel() - 1000):
        assert torch.equal(t[at:at + 1000], marks)
    if host_memory._c_library() is not None:
        assert write_faults(t) < 0.02 * pages(t)


def test_background_populate_without_madvise_zeroes_before_it_returns(monkeypatch):
    monkeypatch.setattr(host_memory, "_c_library", lambda: None)
    t = torch.full((1000,), 7.0)
    done = host_memory.populate_in_background([t], "test pool")
    assert done.is_set() and not t.any()  # zeroing beside writers would lose their data: it happens first


SCRIPT = textwrap.dedent("""
    import ctypes, json, resource, sys
    sys.path.insert(0, sys.argv[1])
    from server.engine import host_memory
    kept = host_memory.keep_freed_heap() if sys.argv[2] == "keep" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def step():  # one step's 16 MiB temporary (a 2,730-token MLP activation of SmolLM2), written, then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(16 << 20)
        libc.memset(p, 1, 16 << 20)
        libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({"kept": kept, "faults": [step() for _ in range(3)], "pages": (16 << 20) // 4096}))
""")


def run_steps(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), mode], env=environ | env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux getrusage")
def test_kept_heap_does_not_fault_a_freed_temporary_in_again():
    """The first step faults its pages in whatever the allocator does. glibc by default mapped the block and
    unmapped it at free, so the second step faulted every page again (its threshold adapts after that; in a
    forward's mix of sizes it kept faulting: ~150,000 faults a 1024-token prefill of SmolLM2, none kept)."""
    control, kept = run_steps("default"), run_steps("keep")
    assert kept["kept"] is True and control["kept"] is None
    assert control["faults"][1] > 0.9 * control["pages"]
    assert kept["faults"][0] > 0.9 * kept["pages"] and max(kept["faults"][1:]) < 0.02 * kept["pages"], kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_own_allocator_tuning_is_left_alone():
    assert run_steps("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")["kept"] is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_background_populate_works_in_chunks_so_others_can_map_memory(monkeypatch):
    """madvise holds the mmap lock for the range of one call: the pool goes in POPULATE_CHUNK calls, so an
    allocation elsewhere in the process waits for one chunk, never the whole pool (counted, not timed)."""
    libc = host_memory._c_library()
    if libc is None or not hasattr(libc, "madvise"):
        pytest.skip("no madvise")
    calls = []

    class Counting:
        def madvise(self, addr, length, advice):
            calls.append(length)
            return libc.madvise(addr, length, advice)

    monkeypatch.setattr(host_memory, "POPULATE_CHUNK", MIB)
    t = torch.empty(8 * MIB // 4 + 100)  # 8 MiB and a bit, page-aligned or not
    assert host_memory._populate_one(Counting(), t)
    assert len(calls) >= 8 and max(calls) <= MIB and sum(calls) >= t.numel() * 4
    assert write_faults(t) < 0.02 * pages(t)
