"""LoadWorker: reads, validates and packs adapters in a separate process, so loads do not stall the step loop.

Why a process: reading an adapter is hundreds of small tensors and checks, i.e. Python bytecode, and Python
bytecode on any thread holds the GIL. The step thread gives the GIL up around every torch op and must win it
back thousands of times per step; while a loader thread runs Python it waits for that thread's switch
interval each time, so a load of ~10 ms of Python stalled the running streams for about as long (measured:
a 16-stream ITL p99 +39..53% while 10 adapters loaded in a thread). In a child process that work holds
another interpreter's GIL; the server process only reads the finished, slot-ready file back (one read, a few
dozen tensor views: load_prepared below).

One worker serves the whole process (all engines, one job at a time: loads are single-flight per adapter
and one loader thread per store feeds it anyway). It is a fresh interpreter (`python -m
server.adapters.load_worker`, over a socket pair), started on first use, niced, with one torch thread (~280 MB
resident with torch imported), and replaced if it dies or stops answering. When no process can be started,
loads run in the calling thread.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path

from server.adapters.formats import AdapterFormatError, check_against_base, load_adapter_dir, read_safetensors
from server.adapters.weights import AdapterWeights, ModuleWeights, PackedBank
from server.errors import AdapterError

log = logging.getLogger(__name__)


def prepare(directory: str, name: str, max_bytes: int, targets: dict, max_rank: int, base_model_name: str | None,
            banks: list[list[str]] | None) -> AdapterWeights:
    """The whole load: read + validate against the base + pack for the device banks."""
    weights = load_adapter_dir(directory, name, max_bytes)
    check_against_base(weights, targets, max_rank, base_model_name)
    weights.prepare_slots(banks)
    return weights


# ---- the prepared form: how the worker hands a slot-ready adapter over (one file, read back in one call) ----
def save_prepared(weights: AdapterWeights, path: Path) -> dict:
    """Write the prepared tensors to one safetensors file; returns the metadata load_prepared needs."""
    from safetensors.torch import save_file

    tensors, banks, in_bank = {}, {}, set()
    for number, pb in weights.packed.items():
        for part in ("a", "b", "ia3", "index"):
            if getattr(pb, part) is not None:
                tensors[f"packed.{number}.{part}"] = getattr(pb, part)
        banks[number] = {"positions": pb.positions, "ranks": pb.ranks, "ia3_on_input": pb.ia3_on_input,
                         "modules": pb.modules}
        in_bank.update(pb.modules)
    modules = {}
    for module, m in weights.modules.items():
        modules[module] = {"scaling": m.scaling, "ia3_on_input": m.ia3_on_input}
        if module not in in_bank:
            for part in ("a", "b", "slot_b", "magnitude", "ia3"):
                if getattr(m, part) is not None:
                    tensors[f"module.{module}.{part}"] = getattr(m, part).contiguous()
    save_file(tensors, str(path))
    return {"name": weights.name, "peft_type": weights.peft_type, "use_dora": weights.use_dora, "path": weights.path,
            "base_model_name_or_path": weights.base_model_name_or_path, "config": weights.config,
            "nbytes": weights.nbytes, "banks": banks, "modules": modules}


def load_prepared(path: Path, meta: dict) -> AdapterWeights:
    """Inverse of save_prepared: one read; every tensor, per module too, is a view into that buffer."""
    t = read_safetensors(path, path.stat().st_size)
    modules = {m: ModuleWeights(scaling=v["scaling"], ia3_on_input=v["ia3_on_input"])
               for m, v in meta["modules"].items()}
    packed = {}
    for number, b in meta["banks"].items():
        pb = PackedBank(b["positions"], t.get(f"packed.{number}.index"), b["ranks"], a=t.get(f"packed.{number}.a"),
                        b=t.get(f"packed.{number}.b"), ia3=t.get(f"packed.{number}.ia3"),
                        ia3_on_input=b["ia3_on_input"], modules=b["modules"])
        packed[int(number)] = pb
        for i, (module, r) in enumerate(zip(pb.modules, pb.ranks)):
            mw = modules[module]
            if pb.a is not None:
                mw.a, mw.slot_b = pb.a[i, :r], pb.b[i, :r]
            else:
                mw.ia3 = pb.ia3[i]
    for key, tensor in t.items():
        if key.startswith("module."):
            module, _, part = key[len("module."):].rpartition(".")
            setattr(modules[module], part, tensor)
    return AdapterWeights(meta["name"], meta["peft_type"], meta["use_dora"], modules, meta["path"],
                          meta["base_model_name_or_path"], meta["config"], packed, _nbytes=meta["nbytes"])


def _child(conn, scratch: str) -> None:
    """The worker loop: job in, ("ok", path, meta) | ("refused", message) | ("error", message) out."""
    try:
        os.nice(10)
    except OSError:
        pass
    import torch

    torch.set_num_threads(1)
    jobs = 0
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        jobs += 1
        try:
            weights = prepare(**job)
            path = Path(scratch) / f"{os.getpid()}-{jobs}.safetensors"
            meta = save_prepared(weights, path)
            del weights
            conn.send(("ok", str(path), meta))
        except AdapterFormatError as e:
            conn.send(("refused", e.message if hasattr(e, "message") else str(e)))
        except Exception as e:  # noqa: BLE001 - reported to the caller as a load failure
            conn.send(("error", f"{type(e).__name__}: {e}"))


class LoadWorker:
    def __init__(self, timeout: float = 600.0) -> None:
        """timeout: seconds one load may take before the worker is presumed stuck and replaced (a 1 GiB
        adapter, the --max-adapter-bytes default, reads in seconds; this is for a hung process, not a slow one)."""
        self.timeout = timeout
        self.lock = threading.Lock()
        self.proc = None
        self.conn = None
        self.scratch: str | None = None
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
                    if not self.conn.poll(self.timeout):
                        self._stop()
                        raise AdapterError(f"{job['directory']}: the adapter loader process took over "
                                           f"{self.timeout:.0f} s; it was stopped and is restarted on the next load")
                    reply = self.conn.recv()
                except (EOFError, OSError, BrokenPipeError):
                    self._stop()
                    raise AdapterError(f"{job['directory']}: the adapter loader process died while reading it "
                                       "(the file may be hostile or the host out of memory); it is restarted "
                                       "on the next load") from None
            else:
                return prepare(**job)
        if reply[0] == "refused":
            raise AdapterFormatError(reply[1])
        if reply[0] == "error":
            raise AdapterError(f"{job['directory']}: {reply[1]}")
        path = Path(reply[1])
        try:
            return load_prepared(path, reply[2])
        finally:
            path.unlink(missing_ok=True)

    def _start(self) -> bool:
        if self.proc is not None and self.proc.poll() is None:
            return True
        self._stop()
        try:
            # A fresh interpreter (`python -m server.adapters.load_worker`), not multiprocessing: never a fork of a
            # process holding torch threads and a CUDA context, and, unlike "spawn", it never re-runs the
            # embedding program's __main__ (an unguarded script, a Ray worker) in the child.
            self.scratch = tempfile.mkdtemp(prefix="swapserve-load-")
            ours, theirs = socket.socketpair()
            root = str(Path(__file__).resolve().parents[2])  # where the `server` package lives
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            self.proc = subprocess.Popen([sys.executable, "-m", "server.adapters.load_worker", str(theirs.fileno()),
                                          self.scratch], pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
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
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
        self.proc = self.conn = self.scratch = None

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


if __name__ == "__main__":  # the worker process: python -m server.adapters.load_worker FD SCRATCH_DIR
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _child(Connection(int(sys.argv[1])), sys.argv[2])
