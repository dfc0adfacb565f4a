"""LoadWorker: reads, validates and packs adapters in a separate process, so loads do not stall the step loop.

Why a process: reading an adapter is hundreds of small tensors and checks, i.e. Python bytecode, and Python
bytecode on any thread holds the GIL. The step thread gives the GIL up around every torch op and must win it
back thousands of times per step; while a loader thread runs Python it waits for that thread's switch
interval each time, so a load of ~10 ms of Python stalled the running streams for about as long (measured:
a 16-stream ITL p99 +39..53% while 10 adapters loaded in a thread). In a child process that work holds
another interpreter's GIL; the server process only maps the finished, slot-ready tensors, which the worker
packed into shared memory (no copy, a few dozen tensor views: Arena and rebuild below).

One worker serves the whole process (all engines, one job at a time: loads are single-flight per adapter
and one loader thread per store feeds it anyway). It is a fresh interpreter (`python -c`, running
load_worker.main over a socket pair), started on first use, niced, with one torch thread (~280 MB
resident with torch imported), and replaced if it dies or stops answering. When no process can be started,
loads run in the calling thread.
"""
from __future__ import annotations

import atexit
import logging
import math
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Callable

import torch

from server.adapters.finite import check_finite
from server.adapters.formats import WEIGHTS_FILE, AdapterFormatError, check_against_base, load_adapter_dir
from server.adapters.weights import AdapterWeights
from server.errors import AdapterError, AdapterNotAllowedError
from server.layers.host_weights import Alloc, ModuleWeights, PackedBank

log = logging.getLogger(__name__)


def prepare(directory: str, name: str, max_bytes: int, targets: dict, max_rank: int, base_model_name: str | None,
            banks: list[list[str]] | None, roots: list[str] | None = None, dtype: torch.dtype = torch.float32,
            mapped: bool = False, alloc: Alloc | None = None) -> AdapterWeights:
    """The whole load: read (every file checked to resolve under ``roots`` once open: AdapterDir) + validate
    against the base + check every value stays finite in the serving ``dtype`` + pack for the device banks
    (``mapped``, ``alloc``: how the worker process reads the file and where it packs to; see read_safetensors,
    Arena)."""
    weights = load_adapter_dir(directory, name, max_bytes, mapped, roots)
    check_against_base(weights, targets, max_rank, base_model_name)
    check_finite(weights, dtype)
    weights.prepare_slots(banks, alloc)
    return weights


# ---- the handoff: the worker packs into shared memory, the server maps that same memory: no copy, no file ----
class Arena:
    """A bump allocator over one anonymous shared-memory file (memfd; an unlinked temporary file where there
    is none), grown in mapped chunks. The worker packs an adapter straight into it and hands the file
    descriptor over the socket; the server maps it, and every tensor is a view into that mapping.

    Why: a load used to cost ~6 copies of the adapter (read, pack, serialize, write, read back), and on a CPU
    host a decode step is bound by memory bandwidth, so those copies on the other core slowed the running
    streams' steps (measured: a copy loop in another process slowed a 16-stream step 26%). Now the packing
    pass is the only one: the file is mapped, not read, and nothing is written twice."""

    ALIGN = 64

    def __init__(self, capacity: int) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("swapserve-adapter", os.MFD_CLOEXEC)
        else:  # not Linux
            self.fd = os.dup((file := tempfile.TemporaryFile()).fileno())
            file.close()
        self.size = 0
        self.chunks: list[tuple[int, int, torch.Tensor]] = []  # (file offset, used bytes, buffer)
        try:
            self._grow(capacity)
        except BaseException:
            os.close(self.fd)
            raise

    def _grow(self, need: int) -> None:
        length = -(-max(need, self.size, 1) // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        os.ftruncate(self.fd, self.size + length)  # sparse: pages exist only once written
        buf = torch.frombuffer(mmap.mmap(self.fd, length, offset=self.size), dtype=torch.uint8)
        self.chunks.append((self.size, 0, buf))
        self.size += length

    def alloc(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        offset, used, buf = self.chunks[-1]
        start = -(-used // self.ALIGN) * self.ALIGN
        if start + n > len(buf):
            self._grow(n)
            (offset, used, buf), start = self.chunks[-1], 0
        self.chunks[-1] = (offset, start + n, buf)
        return buf[start:start + n].view(dtype).view(shape)

    def offset(self, t: torch.Tensor) -> int | None:
        """Where ``t``'s memory starts in the file, or None when it is not in the arena."""
        ptr = t.data_ptr()
        for offset, used, buf in self.chunks:
            if buf.data_ptr() <= ptr < buf.data_ptr() + used:
                return offset + ptr - buf.data_ptr()
        return None

    def place(self, t: torch.Tensor) -> tuple[int, str, list[int]]:
        """(file offset, dtype, shape) of ``t`` in the arena, copying it in first if it lives elsewhere."""
        dtype = str(t.dtype).removeprefix("torch.")
        if t.numel() == 0:  # no bytes, so no address in the arena (a rank-0 AdaLoRA module)
            return 0, dtype, list(t.shape)
        if not t.is_contiguous() or self.offset(t) is None:
            t = self.alloc(tuple(t.shape), t.dtype).copy_(t)
        return self.offset(t), dtype, list(t.shape)

    def used(self) -> int:
        """Bytes up to the end of the last allocation: what the server maps (the rest was never written, so
        it holds no memory)."""
        offset, used, _ = self.chunks[-1]
        return offset + used

    def close(self) -> None:
        self.chunks.clear()  # the mappings go with the last view of them
        os.close(self.fd)


def describe(weights: AdapterWeights, arena: Arena) -> dict:
    """What the server needs to rebuild ``weights`` from the arena's memory: every tensor as (offset, dtype,
    shape), plus the rest of the adapter's fields."""
    tensors, banks, in_bank = {}, {}, set()
    for number, pb in weights.packed.items():
        for part in ("a", "b", "ia3", "index"):
            if getattr(pb, part) is not None:
                tensors[f"packed.{number}.{part}"] = arena.place(getattr(pb, part))
        banks[number] = {"positions": pb.positions, "ranks": pb.ranks, "ia3_on_input": pb.ia3_on_input,
                         "modules": pb.modules}
        in_bank.update(pb.modules)
    modules = {}
    for module, m in weights.modules.items():
        modules[module] = {"scaling": m.scaling, "ia3_on_input": m.ia3_on_input}
        if module not in in_bank:
            for part in ("a", "b", "slot_b", "magnitude", "ia3"):
                if getattr(m, part) is not None:
                    tensors[f"module.{module}.{part}"] = arena.place(getattr(m, part))
    return {"name": weights.name, "peft_type": weights.peft_type, "use_dora": weights.use_dora, "path": weights.path,
            "base_model_name_or_path": weights.base_model_name_or_path, "config": weights.config,
            "nbytes": weights.nbytes, "content_hash": weights.content_hash, "banks": banks, "modules": modules,
            "tensors": tensors, "size": arena.used()}


# where opening "<dir>/N" opens descriptor N's file
_FD_DIR = next((d for d in ("/proc/self/fd", "/dev/fd") if os.path.isdir(d)), None)


def rebuild(fd: int, meta: dict) -> AdapterWeights:
    """Inverse of describe, in the server: map the arena and view every tensor in it; nothing is copied.

    Every page is faulted in here, on the loader thread, so none faults on the step thread at the adapter's
    first slot fill. By touching one byte per page, not MAP_POPULATE: populating holds the process's memory
    map lock for the whole range, and the step thread's own mmap/munmap waits on it (measured: steps while 10
    adapters loaded +15..17% with MAP_POPULATE, +5..10% touching)."""
    try:
        size = meta["size"]
        # torch.from_file, not mmap.mmap: Python's mmap object keeps a descriptor open for as long as it lives,
        # one per adapter in the host tier, and thousands of adapters would run out of descriptors.
        if not size:
            buf = torch.empty(0, dtype=torch.uint8)
        elif _FD_DIR:
            buf = torch.from_file(f"{_FD_DIR}/{fd}", shared=True, size=size, dtype=torch.uint8)
        else:  # no /proc or /dev/fd to open the descriptor by: map it directly (holding a descriptor)
            buf = torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
    finally:
        os.close(fd)
    t = {}
    for key, (off, name, shape) in meta["tensors"].items():
        dtype = getattr(torch, name)
        raw = buf[off:off + math.prod(shape) * dtype.itemsize]
        raw[::mmap.PAGESIZE].sum()  # fault the pages in (only the tensors': a gap read would allocate a page)
        t[key] = raw.view(dtype).view(shape)
    modules = {m: ModuleWeights(scaling=v["scaling"], ia3_on_input=v["ia3_on_input"])
               for m, v in meta["modules"].items()}
    packed = {}
    for number, b in meta["banks"].items():
        pb = PackedBank(b["positions"], t.get(f"packed.{number}.index"), b["ranks"], a=t.get(f"packed.{number}.a"),
                        b=t.get(f"packed.{number}.b"), ia3=t.get(f"packed.{number}.ia3"),
                        ia3_on_input=b["ia3_on_input"], modules=b["modules"])
        packed[int(number)] = pb
        members = [modules[m] for m in pb.modules]
        if pb.a is not None:
            for mw, a, b_t in zip(members, *pb.rows()):
                mw.a, mw.slot_b = a, b_t
        else:
            for mw, ia3 in zip(members, pb.ia3.unbind(0)):
                mw.ia3 = ia3
    for key, tensor in t.items():
        if key.startswith("module."):
            module, _, part = key[len("module."):].rpartition(".")
            setattr(modules[module], part, tensor)
    return AdapterWeights(meta["name"], meta["peft_type"], meta["use_dora"], modules, meta["path"],
                          meta["base_model_name_or_path"], meta["config"], packed, meta["content_hash"],
                          _nbytes=meta["nbytes"])


# refusals the worker reports by class name, so the server raises the same class (400, or 403 out of the roots)
_REFUSALS = {cls.__name__: cls for cls in (AdapterFormatError, AdapterNotAllowedError, AdapterError)}


def _child(conn) -> None:
    """The worker loop: job in, ("ok", meta) and the arena's descriptor | ("refused", message, class name) |
    ("error", message) out."""
    try:
        os.nice(10)
    except OSError:
        pass
    torch.set_num_threads(1)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        arena = None
        try:
            source = Path(job["directory"]) / WEIGHTS_FILE  # packed, LoRA B turns float32: room for twice it
            arena = Arena(2 * source.stat().st_size + (1 << 20) if source.is_file() else 1 << 20)
            meta = describe(prepare(**job, mapped=True, alloc=arena.alloc), arena)
            conn.send(("ok", meta))
            send_handle(conn, arena.fd, os.getppid())
        except AdapterError as e:
            conn.send(("refused", e.message, type(e).__name__ if type(e).__name__ in _REFUSALS else "AdapterError"))
        except Exception as e:  # noqa: BLE001 - reported to the caller as a load failure
            conn.send(("error", f"{type(e).__name__}: {e}"))
        finally:
            if arena is not None:
                arena.close()


class LoadWorker:
    def __init__(self, timeout: float = 600.0) -> None:
        """timeout: seconds one load may take before the worker is presumed stuck and replaced (a 1 GiB
        adapter, the --max-adapter-bytes default, reads in seconds; this is for a hung process, not a slow one)."""
        self.timeout = timeout
        self.lock = threading.Lock()
        self.proc = None
        self.conn = None
        self.disabled = False

    def start(self) -> None:
        """Start the process now (servers call this at start-up, off the request path: the first load would
        otherwise also pay the worker's ~1 s of importing torch)."""
        with self.lock:
            if not self.disabled:
                self._start()

    def load(self, **job) -> AdapterWeights:
        with self.lock:
            if not self.disabled and self._start():
                try:
                    self.conn.send(job)
                    reply = self._answer(job, self.conn.recv)
                    if reply[0] == "ok":
                        fd = self._answer(job, lambda: recv_handle(self.conn))
                        os.set_inheritable(fd, False)  # never into a process another thread starts meanwhile
                except (EOFError, OSError, RuntimeError):  # RuntimeError: no descriptor came with the reply
                    self._stop()
                    raise AdapterError(f"{job['directory']}: the adapter loader process died while reading it "
                                       "(the file may be hostile or the host out of memory); it is restarted "
                                       "on the next load") from None
            else:
                return prepare(**job)
        if reply[0] == "refused":
            raise _REFUSALS[reply[2]](reply[1])
        if reply[0] == "error":
            raise AdapterError(f"{job['directory']}: {reply[1]}")
        return rebuild(fd, reply[1])

    def _answer(self, job: dict, read: Callable):
        """``read()`` once the worker has sent something, or, past the timeout, stop it and fail the load."""
        if not self.conn.poll(self.timeout):
            self._stop()
            raise AdapterError(f"{job['directory']}: the adapter loader process took over {self.timeout:.0f} s; "
                               "it was stopped and is restarted on the next load")
        return read()

    def _start(self) -> bool:
        if self.proc is not None and self.proc.poll() is None:
            return True
        self._stop()
        try:
            # A fresh interpreter (`python -c`, see _BOOT), not multiprocessing: never a fork of a
            # process holding torch threads and a CUDA context, and, unlike "spawn", it never re-runs the
            # embedding program's __main__ (an unguarded script, a Ray worker) in the child.
            ours, theirs = socket.socketpair()
            # This very copy of the package, ahead of the working directory on sys.path (`-m` would put the
            # working directory first, and a `server` package there would run instead of this one).
            root = str(Path(__file__).resolve().parents[2])
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, root, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
            theirs.close()
            self.conn = Connection(ours.detach())
            log.info("adapter loader process started (pid %d)", self.proc.pid)
            return True
        except Exception as e:  # noqa: BLE001 - e.g. a sandbox that forbids new processes
            log.warning("cannot start the adapter loader process (%s); loading adapters in-process", e)
            self.disabled = True
            self._stop()
            return False

    def _stop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.send(None)
            except (OSError, ValueError):
                pass
            self.conn.close()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = self.conn = None

    close = _stop


_shared: LoadWorker | None = None
_shared_lock = threading.Lock()


def shared_worker() -> LoadWorker:
    """The process-wide worker (created on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = LoadWorker()
            atexit.register(_shared.close)
        return _shared


# sys.path[0] is the working directory under -c: replaced by this package's root, so nothing there (a
# `server` package, a json.py) is imported in the worker instead of the real thing.
_BOOT = "import sys; sys.path[0] = sys.argv[1]; from server.adapters.load_worker import main; main(int(sys.argv[2]))"


def main(fd: int) -> None:
    """The worker process's entry (see _BOOT): serve jobs on the socket ``fd`` until it closes."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _child(Connection(fd))
