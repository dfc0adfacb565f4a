"""The CPU fast path of the LoRA op: one compiled loop over the step's adapter tokens, run by run (numba).

Semantics are ``ops.lora_segments``' (the plain-torch reference): for every entry (token t, scale c) of the run on
slot s,
    y[t] += c * (x[t] @ A[s, :r].T) @ B[s, :r]      r = ranks[s]; r == 0 leaves the tokens untouched.
A token of a mixture appears in one run per component.
Why not bmm: a decode step with k adapters has ~N/k tokens per adapter, so the op is k small matmuls that
stream every adapter's A and B from memory once (312 MB a step at 16 adapters of r16 on SmolLM2). torch's
bmm packs each tiny operand first and, with the gather/scatter around it, ran at ~2.3x the bandwidth floor
here; this loop reads each row of A and B once per run, straight from the slot tensors (no gather, no
packing, no temporaries past [run, r]): 12 ms instead of 21-25 ms for one step's 210 layers in isolation,
18 instead of 29 ms inside a SmolLM2 decode step (bench/profile_step.py).
It is used for float32 on CPU, for runs up to ``max_run(threads)`` tokens; longer runs are matmul-shaped
and stay with torch's GEMM. It releases the GIL, so HTTP work overlaps it.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import torch

try:  # an optional speed-up: without numba every step takes the torch path, with the same results
    import numba
except ImportError:  # pragma: no cover - numba ships wheels for every platform we build on
    numba = None

_CLOCK_MONOTONIC = getattr(time, "CLOCK_MONOTONIC", 1)  # the platform's clockid (1 on Linux)


def available() -> bool:
    return numba is not None


def max_run(threads: int) -> int:
    """The longest run of one slot's tokens worth handing to the kernel at ``threads`` torch threads.

    Measured on 2 EPYC cores (30 layers x 7 SmolLM2 shapes, r16, 16 slots): with one thread the kernel beats
    the bmm path at every run length up to 64 (176 vs 243 ms for a 16-adapter prefill of 64 tokens each) and
    the plain per-slot loop up to ~128; the kernel is single-threaded, so with two threads torch's ops, which
    split across them, overtake it from 4 tokens a run (21 vs 20 ms) and win prefill by ~1.7x, while decode
    with 2 tokens a run stays the kernel's (15 vs 21 ms)."""
    return 128 if threads <= 1 else 3


SIGNATURE = ("void(f4[:, ::1], f4[:, ::1], f4[:, :, ::1], f4[:, :, ::1], i8[::1], i8[::1], i8[::1], i8[::1], "
             "f4[::1])")


def _lora_runs(y, x, a, b, ranks, order, starts, slots, weights):
    """y: [T, out]  x: [T, in]  a: [S, R, in]  b: [S, R, out]  ranks: [S]
    order: [n] token indices, run by run; run j = order[starts[j]:starts[j + 1]], all on slot slots[j];
    weights: [n] the scale of each entry of order."""
    n_in, n_out = x.shape[1], y.shape[1]
    h = np.empty((order.shape[0], a.shape[1]), dtype=np.float32)  # [n, R] shrunk activations
    for j in range(slots.shape[0]):
        s, lo, hi = slots[j], starts[j], starts[j + 1]
        rank = ranks[s]
        for r in range(rank):  # shrink: each row of A is read once for the whole run
            for k in range(lo, hi):
                t = order[k]
                acc = np.float32(0.0)
                for i in range(n_in):
                    acc += a[s, r, i] * x[t, i]
                h[k, r] = acc * weights[k]
        for k in range(lo, hi):  # expand: y[t] += sum_r h[r] * B[s, r]
            t = order[k]
            for r in range(rank):
                hr = h[k, r]
                for o in range(n_out):
                    y[t, o] += hr * b[s, r, o]


@functools.cache
def _compiled():
    """The loop above compiled once per process (numba's on-disk cache makes later starts ~0.1 s)."""
    options = dict(nogil=True, fastmath={"reassoc", "contract"}, boundscheck=False)
    try:
        return numba.njit(SIGNATURE, cache=True, **options)(_lora_runs)
    except RuntimeError:  # no writable cache location (read-only install, no home): compile for this process
        return numba.njit(SIGNATURE, cache=False, **options)(_lora_runs)


def lora_runs(y: torch.Tensor, x: torch.Tensor, a: np.ndarray, b: np.ndarray, ranks: np.ndarray, runs) -> None:
    """y += LoRA(x) in place for the step's runs (``mapping.SlotRuns``).

    y: [num_tokens, out] float32   x: [num_tokens, in] float32 (both CPU, contiguous)
    a, b: the layer's slot tensors as numpy views, [num_slots, max_rank, in] / [num_slots, max_rank, out]
    ranks: [num_slots] int64, each slot's live rank in this layer (rows past it are never read)
    """
    _compiled()(y.numpy(), x.numpy(), a, b, ranks, runs.order, runs.starts, runs.slots, runs.weights)


# ---- the LoRA worker's handoff (lora_worker.py): a shared int64 control array read and written with atomic
# (sequentially consistent) loads and stores, and the worker's loop, all compiled and run without the GIL

if numba is not None:
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _word(context, builder, aryty, ary, index):
        return cgutils.get_item_pointer(context, builder, aryty, context.make_array(aryty)(context, builder, ary),
                                        [index])

    @intrinsic
    def _atomic_load(typingctx, arr, index):
        def codegen(context, builder, sig, args):
            return builder.load_atomic(_word(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
        return types.int64(arr, index), codegen

    @intrinsic
    def _atomic_store(typingctx, arr, index, value):
        def codegen(context, builder, sig, args):
            builder.store_atomic(args[2], _word(context, builder, sig.args[0], args[0], args[1]), "seq_cst", 8)
            return context.get_dummy_value()
        return types.void(arr, index, value), codegen

    @intrinsic
    def _atomic_claim(typingctx, arr, index, expected, value):
        """ctrl[index] = value if it holds ``expected`` (compare-and-swap); whether it did."""
        def codegen(context, builder, sig, args):
            ptr = _word(context, builder, sig.args[0], args[0], args[1])
            result = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
            return builder.extract_value(result, 1)
        return types.boolean(arr, index, expected, value), codegen

    @intrinsic
    def _pointer(typingctx, address):
        """An int64 address as a pointer, for numba.carray."""
        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return types.voidptr(address), codegen

    _OPTIONS = dict(nogil=True, fastmath={"reassoc", "contract"}, boundscheck=False, cache=True)
    _kernel = numba.njit(**_OPTIONS)(_lora_runs)  # the same loop, callable from the worker's compiled loop

    @numba.njit(nogil=True, cache=True)
    def _load(ctrl, index):
        return _atomic_load(ctrl, index)

    @numba.njit(nogil=True, cache=True)
    def _publish(ctrl, index, value):
        _atomic_store(ctrl, index, value)

    @numba.njit(nogil=True, cache=True)
    def _claim(ctrl, seq):
        return _atomic_claim(ctrl, 1, seq - 1, seq)

    @numba.njit(nogil=True, cache=True)
    def _post(ctrl, seq):
        _atomic_store(ctrl, 0, seq)
        return _atomic_load(ctrl, 3) != 0

    @numba.njit(nogil=True, cache=True)
    def _wait_for(ctrl, index, value, spins):
        for _ in range(spins):
            if _atomic_load(ctrl, index) == value:
                return True
        return _atomic_load(ctrl, index) == value

    @numba.njit(nogil=True, cache=True)
    def _now_ns(clock, ts):
        clock(_CLOCK_MONOTONIC, ts.ctypes)
        return ts[0] * 1_000_000_000 + ts[1]

    @numba.njit(**_OPTIONS)
    def _serve(ctrl, job, idle_ns, give_way, clock, ts):
        """Run each job posted (ctrl[0] past ctrl[1]) that this thread claims first; False once idle for
        ``idle_ns`` nanoseconds of wall time (``clock``: clock_gettime, into ``ts``), True on stop. job: the
        arguments of lora_runs as addresses and sizes (lora_worker.py's words). Each idle check first calls
        ``give_way`` (sched_yield): the core is only lent to the worker, and any other thread that wants it (the
        HTTP event loop, the adapter loader) gets it at once. The bound is a time, not a count of checks: on a
        busy machine each sched_yield can give the core away for a whole time slice (ms), so a count calibrated
        on an idle moment let a worker spin for seconds before it slept (a CI run waited 5 s in vain)."""
        idle_since = -1
        while True:
            posted = _atomic_load(ctrl, 0)
            if posted == _atomic_load(ctrl, 1):
                if _atomic_load(ctrl, 4):
                    return True
                now = _now_ns(clock, ts)
                if idle_since < 0:
                    idle_since = now
                elif now - idle_since >= idle_ns:
                    return False
                give_way()
                continue
            idle_since = -1
            if not _atomic_claim(ctrl, 1, posted - 1, posted):
                continue  # the step thread took it back
            t, n_in, n_out, s, r, n, runs = job[9], job[10], job[11], job[12], job[13], job[14], job[15]
            f4, i8 = np.float32, np.int64
            y = numba.carray(_pointer(job[0]), (t, n_out), f4)
            y[:] = 0
            _kernel(y, numba.carray(_pointer(job[1]), (t, n_in), f4),
                    numba.carray(_pointer(job[2]), (s, r, n_in), f4),
                    numba.carray(_pointer(job[3]), (s, r, n_out), f4), numba.carray(_pointer(job[4]), (s,), i8),
                    numba.carray(_pointer(job[5]), (n,), i8), numba.carray(_pointer(job[7]), (runs + 1,), i8),
                    numba.carray(_pointer(job[8]), (runs,), i8), numba.carray(_pointer(job[6]), (n,), f4))
            _atomic_store(ctrl, 2, posted)


def load(ctrl: np.ndarray, index: int) -> int:
    return _load(ctrl, index)


def publish(ctrl: np.ndarray, index: int, value: int) -> None:
    """ctrl[index] = value, ordered after every write this thread made before it."""
    _publish(ctrl, index, value)


def claim(ctrl: np.ndarray, seq: int) -> bool:
    """Take job ``seq`` (posted, not yet started by the worker) to run here; whether this thread got it."""
    return _claim(ctrl, seq)


def post(ctrl: np.ndarray, seq: int) -> bool:
    """ctrl[POSTED] = seq, ordered after every write this thread made before it; whether the worker sleeps."""
    return _post(ctrl, seq)


def wait_for(ctrl: np.ndarray, index: int, value: int, spins: int) -> bool:
    """Spin (without the GIL) until ctrl[index] == value; False if it did not within ``spins`` checks."""
    return _wait_for(ctrl, index, value, spins)


def serve(ctrl: np.ndarray, job: np.ndarray, idle_s: float, ts: np.ndarray) -> bool:
    """Run the jobs posted to ``ctrl`` / ``job`` on this thread (lora_worker.py) until it has been idle for
    ``idle_s`` seconds (False) or is stopped (True). ts: two int64 words of scratch for the clock, this
    thread's own."""
    return _serve(ctrl, job, int(idle_s * 1e9), _give_way(), _clock(), ts)


@functools.cache
def _give_way():
    """sched_yield as a ctypes function (passed to the compiled loop as an argument, so it stays cacheable);
    a no-op where the C library has none."""
    import ctypes

    try:
        fn = ctypes.CDLL(None).sched_yield
    except (OSError, AttributeError):  # pragma: no cover - every POSIX libc has it
        fn = numba.cfunc("int32()")(lambda: 0).ctypes
    fn.argtypes, fn.restype = [], ctypes.c_int
    return fn


@functools.cache
def _clock():
    """clock_gettime as a ctypes function (an argument of the compiled loop, as ``_give_way``): ~30 ns a call
    through the vDSO."""
    import ctypes

    fn = ctypes.CDLL(None).clock_gettime
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_int
    return fn


@functools.cache
def spins_for(seconds: float) -> int:
    """How many checks of a word (``wait_for``) take about ``seconds`` on this CPU (measured once)."""
    ctrl = np.zeros(5, np.int64)
    n = 1 << 20
    wait_for(ctrl, 0, 1, 1)  # compiled or loaded from the cache first
    start = time.perf_counter()
    wait_for(ctrl, 0, 1, n)
    return max(1, int(n * seconds / max(time.perf_counter() - start, 1e-9)))


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) before the first request, not during it."""
    y, x = torch.zeros(1, 2), torch.ones(1, 2)
    a, b = np.ones((1, 1, 2), np.float32), np.ones((1, 1, 2), np.float32)
    one, zero = np.ones(1, np.int64), np.zeros(1, np.int64)
    _compiled()(y.numpy(), x.numpy(), a, b, one, zero, np.array([0, 1], np.int64), zero, np.ones(1, np.float32))
    if not torch.equal(y, torch.full((1, 2), 2.0)):
        raise RuntimeError("the compiled LoRA kernel gave a wrong result; start with --lora-kernel torch")
