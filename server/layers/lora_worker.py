"""LoraWorker: a thread that runs the compiled CPU LoRA kernel while the step thread runs the base GEMM.

Why: with many adapters in a decode step the LoRA op streams every adapter's A and B from memory (16 adapters of
r16 on SmolLM2: 312 MB a step, 64 adapters 1.25 GB), while the base GEMM of the same layer is compute-bound; they
are independent (y = W x + delta), so on two cores they overlap. The server leaves one core to the HTTP side
(--threads 0); during a step that core is mostly idle. Measured on 2 EPYC cores: the 210 layers' GEMMs of a
32-row SmolLM2 step took 84 ms alone and 85 ms with the 16-adapter kernel (25 ms alone) on the other core.

The handoff is what decides whether that pays: a layer's LoRA work is ~100 us, and a step has 210 of them. A
thread woken through a lock (queue, Event) pays the futex wake-up of an idle CPU, which in a VM is an exit to the
hypervisor: measured here ~190 us per layer for a no-op job, more than the work it moved. So the worker never
sleeps while a step is running: it waits for jobs by spinning in compiled code (numba, no GIL), reading a shared
counter with atomic loads; the step thread publishes a job (pointers and sizes in an int64 array) with an atomic
store and waits for it the same way. A round trip costs ~1 us. While it waits, the worker calls sched_yield
before each check, so its core stays free for any other thread that wants it (the HTTP event loop, the adapter
loader process): a spin that held it made adapter loads 4x slower beside running streams. After ``SPIN_S``
without a job (between steps) the worker goes to sleep on an Event, and the next job wakes it (one slow wake-up
per step, not per layer).
The worker claims a job with a compare-and-swap before it starts it; a job still unclaimed when the step thread
comes to wait for it (the worker was asleep, or descheduled: the HTTP event loop shares its core) is claimed
back and run on the step thread, so a step never waits for a thread that is not running.

The step thread, once its GEMM is done, takes the rest of the layer's runs itself (NumbaLora._overlapped in
lora_backend.py): for the narrow k/v projections the LoRA work outweighs the GEMM, and waiting would idle its core.
"""
from __future__ import annotations

import threading

import numpy as np

from server.layers import kernels

# ctrl words: the last job posted, claimed (by the worker, or taken back by the step thread), done by the worker
POSTED, CLAIMED, DONE, SLEEPING, STOP = range(5)
# job words: the kernel's arguments as (addresses, sizes)
Y, X, A, B, RANKS, ORDER, WEIGHTS, STARTS, SLOTS, TOKENS, N_IN, N_OUT, NUM_SLOTS, MAX_RANK, ENTRIES, RUNS = range(16)
SPIN_S = 0.001  # how long an idle worker spins before it sleeps: longer than a decode step's gaps between layers


class LoraWorker:
    def __init__(self) -> None:
        self._ctrl = np.zeros(5, np.int64)
        self._job = np.zeros(16, np.int64)
        self._seq = 0
        self._slots: dict[int, tuple] = {}  # id(a) -> (a, b, ranks, their addresses)
        self._runs: tuple | None = None  # (the step's SlotRuns, its arrays' addresses)
        self._pending: tuple = ()  # the job in flight, as lora_runs arguments, for the step thread to take back
        self._wake = threading.Event()
        self._spins = kernels.spins_for(SPIN_S)  # the step thread's wait, between checks that the worker is alive
        self._clock_words = np.zeros(2, np.int64)  # the worker thread's scratch for clock_gettime
        stopped = np.array([0, 0, 0, 0, 1], np.int64)
        kernels.serve(stopped, self._job, SPIN_S, self._clock_words)  # compiled (or loaded from the cache) here
        kernels.post(stopped, 0)
        kernels.claim(stopped, 1)
        kernels.publish(stopped, SLEEPING, 0)
        kernels.load(stopped, SLEEPING)
        self._thread = threading.Thread(target=self._run, name="lora-worker", daemon=True)
        self._thread.start()

    def submit(self, y, x, a: np.ndarray, b: np.ndarray, ranks: np.ndarray, runs, count: int) -> None:
        """Start ``kernels.lora_runs`` on the worker for runs [0, count) of ``runs`` (a SlotRuns), adding into y
        from zero: y [tokens, out] float32 (its contents are overwritten), x [tokens, in] float32, both
        contiguous CPU tensors; a, b, ranks the layer's numpy slot views (kept for the layer's life). The caller
        keeps y and x alive and untouched until ``wait`` returns.

        This runs ~200 times a step, so it only writes words: the addresses of a layer's slots and of a step's
        runs are taken once (cached by object, the object held so its id is never reused)."""
        job = self._job
        job[A:RANKS + 1] = self._words(a, b, ranks)
        job[ORDER:SLOTS + 1] = self._runs_words(runs)
        job[Y], job[X], job[TOKENS], job[N_IN], job[N_OUT] = y.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], \
            y.shape[1]
        job[NUM_SLOTS], job[MAX_RANK], job[ENTRIES], job[RUNS] = a.shape[0], a.shape[1], runs.order.shape[0], count
        self._pending = (y, x, a, b, ranks, runs, count)
        self._seq += 1
        if kernels.post(self._ctrl, self._seq):  # a release (the words above are visible first); True: it sleeps
            self._wake.set()

    def _words(self, a: np.ndarray, b: np.ndarray, ranks: np.ndarray) -> tuple[int, int, int]:
        hit = self._slots.get(id(a))
        if hit is None or hit[0] is not a:
            if not all(arr.flags.c_contiguous for arr in (a, b, ranks)) or ranks.dtype != np.int64:
                raise ValueError("LoraWorker: slot arrays must be C-contiguous (ranks int64)")
            hit = self._slots[id(a)] = (a, b, ranks, (a.ctypes.data, b.ctypes.data, ranks.ctypes.data))
        return hit[3]

    def _runs_words(self, runs) -> tuple[int, int, int, int]:
        hit = self._runs
        if hit is None or hit[0] is not runs:
            arrays = (runs.order, runs.weights, runs.starts, runs.slots)
            if not all(arr.flags.c_contiguous for arr in arrays):
                raise ValueError("LoraWorker: SlotRuns arrays must be C-contiguous")
            hit = self._runs = (runs, tuple(arr.ctypes.data for arr in arrays))
        return hit[1]

    def finished(self) -> bool:
        """Whether the worker already finished the submitted job."""
        return kernels.load(self._ctrl, DONE) == self._seq

    def wait(self) -> bool:
        """Until the submitted job is done; True if the worker did it. A job the worker has not started yet
        (it was descheduled: the HTTP thread shares its core, or it was asleep) is taken back and run on this
        thread, so a step never waits for a thread that is not running. Waiting spins (without the GIL); past a
        while it wakes the worker again, in case it went to sleep as the job came, and fails if it is gone."""
        y, x, a, b, ranks, runs, count = self._pending
        self._pending = ()
        if kernels.claim(self._ctrl, self._seq):
            y.zero_()
            kernels.lora_runs(y, x, a, b, ranks, runs.split(count)[0])
            return False
        while not kernels.wait_for(self._ctrl, DONE, self._seq, self._spins):
            if not self._thread.is_alive():
                raise RuntimeError("the LoRA worker thread died")
            self._wake.set()
        return True

    def close(self) -> None:
        kernels.publish(self._ctrl, STOP, 1)
        self._wake.set()
        self._thread.join(5)

    def _run(self) -> None:
        ctrl = self._ctrl
        while not kernels.serve(ctrl, self._job, SPIN_S, self._clock_words):  # False: idle SPIN_S; True: stopped
            kernels.publish(ctrl, SLEEPING, 1)
            # a job posted before the flag was seen by submit() is caught here; one posted after it sees the flag
            if kernels.load(ctrl, POSTED) == kernels.load(ctrl, CLAIMED) and not kernels.load(ctrl, STOP):
                self._wake.wait()
            self._wake.clear()
            kernels.publish(ctrl, SLEEPING, 0)

