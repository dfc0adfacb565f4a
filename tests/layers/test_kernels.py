"""The compiled CPU LoRA kernel (server/layers/kernels.py) and the runs it reads (mapping.SlotRuns), against
the plain-torch reference op and the per-token contract; AdapterLinear and the runner take it end to end
(test_ops.py's PEFT layer test and test_mixed_batch.py run with it and without it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from support import per_token

from server.layers import kernels
from server.layers.mapping import ALONE_MAX_RUN, NO_SLOT, AdapterMapping, Routes, SlotRuns
from server.layers.ops import lora_segments

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

SLOTS, MAX_RANK, IN, OUT = 4, 8, 24, 20
RUN = 128  # kernels.max_run(1): the suite runs one torch thread


def slot_tensors(ranks, gen):
    """Slot tensors with NaN past each live rank: the kernel must never read those rows."""
    a = torch.randn(SLOTS, MAX_RANK, IN, generator=gen)
    b = torch.randn(SLOTS, MAX_RANK, OUT, generator=gen)
    for s, r in enumerate(ranks):
        a[s, r:] = float("nan")
        b[s, r:] = float("nan")
    return a, b


def test_runs_group_tokens_by_slot_in_order():
    runs = SlotRuns.build(Routes.per_token(per_token([3, NO_SLOT, 1, 3, 1], 2)), max_run=8)
    assert runs.slots.tolist() == [1, 3]
    assert runs.starts.tolist() == [0, 4, 8]
    assert runs.order.tolist() == [4, 5, 8, 9, 0, 1, 6, 7]  # slot 1's tokens, then slot 3's; base tokens absent
    assert runs.order.dtype == runs.starts.dtype == runs.slots.dtype == np.int64


def test_a_run_longer_than_max_run_leaves_the_step_to_torch():
    assert SlotRuns.build(Routes.per_token(per_token([0, 0, 2], 4)), max_run=7) is None  # slot 0 has 8 tokens
    m = AdapterMapping.build(per_token([0, 0, 2], 4), num_slots=SLOTS, max_run=7)
    assert m.runs is None and m.groups is not None  # the bmm path takes it
    m = AdapterMapping.build(per_token([0, 0, 2], 4), num_slots=SLOTS, max_run=8)
    assert m.runs is not None and m.groups is None  # no padded groups are built for a kernel step


def test_a_step_on_one_slot_alone_keeps_its_addmm_path_past_a_few_tokens():
    long_alone = AdapterMapping.build(per_token([2, 2], ALONE_MAX_RUN), num_slots=SLOTS, max_run=RUN)
    assert long_alone.runs is None and long_alone.segments[0][1] is None  # one matmul pair, no gather
    short_alone = AdapterMapping.build(per_token([2, 2], ALONE_MAX_RUN // 2), num_slots=SLOTS, max_run=RUN)
    assert short_alone.runs is not None
    with_base = AdapterMapping.build(per_token([2, NO_SLOT], ALONE_MAX_RUN), num_slots=SLOTS, max_run=RUN)
    assert with_base.runs is not None  # base rows mean a gather anyway: the kernel is the cheaper one


def test_with_a_lora_worker_one_adapter_alone_goes_to_it_too():
    """The worker takes a lone adapter's run off the step thread (the addmm would run there after the GEMM):
    NumbaLora with a worker plans runs up to its max_run for it, and hands every step with an adapter over."""
    from server.layers.lora_backend import NumbaLora
    from server.layers.lora_worker import LoraWorker

    routes = Routes.per_token(per_token([2, 2], ALONE_MAX_RUN))
    assert AdapterMapping.route(routes, SLOTS, max_run=RUN, alone_max_run=RUN).runs.slots.tolist() == [2]
    assert NumbaLora(RUN).plan(routes, SLOTS, torch.device("cpu")).runs is None  # no worker: the addmm path
    worker = LoraWorker()
    try:
        planned = NumbaLora(RUN, worker).plan(routes, SLOTS, torch.device("cpu"))
        assert planned.runs.slots.tolist() == [2] and planned.overlap is worker
    finally:
        worker.close()


def test_max_run_is_short_when_torch_has_threads_to_split_over():
    assert kernels.max_run(1) >= 64 and 2 <= kernels.max_run(2) < 8


def test_mapping_without_max_run_has_no_runs():
    assert AdapterMapping.build(per_token([0, 1], 1), num_slots=SLOTS).runs is None


@pytest.mark.parametrize("rows, tpr", [
    ([0, NO_SLOT, 2, 0, 1, NO_SLOT, 3], 1),  # decode: a few tokens per slot, base rows between
    ([1, 1, 1], 5),  # one slot for the whole step
    ([3, NO_SLOT, 2, 2], 4),  # prefill-shaped
    ([1], 1),  # rank 0: the slot's adapter does not touch this layer
])
def test_kernel_matches_reference_and_leaves_other_tokens_bit_exact(rows, tpr):
    gen = torch.Generator().manual_seed(0)
    ranks = np.array([3, 0, 8, 1], dtype=np.int64)
    a, b = slot_tensors(ranks, gen)
    n = len(rows) * tpr
    x, y = torch.randn(n, IN, generator=gen), torch.randn(n, OUT, generator=gen)
    m = AdapterMapping.build(per_token(rows, tpr), SLOTS, max_run=RUN)
    want = y.clone()
    lora_segments(want, x, a, b, ranks.tolist(), m.segments)
    got = y.clone()
    with torch.inference_mode():  # as the runner calls it
        kernels.lora_runs(got, x, a.numpy(), b.numpy(), ranks, m.runs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    token_slots = [s for s in rows for _ in range(tpr)]
    untouched = [t for t, s in enumerate(token_slots) if s == NO_SLOT or ranks[s] == 0]
    assert torch.equal(got[untouched], y[untouched])


def test_lora_worker_equals_the_kernel_for_every_job_and_after_it_slept(monkeypatch):
    """The spin-waiting worker (lora_worker.py): each job equals the kernel on the same runs (its first ``count``
    runs, into a buffer it zeroes itself, whatever was there), jobs follow each other on the same words, a job
    posted after the worker went to sleep wakes it, and close() ends the thread."""
    import time

    from server.layers import lora_worker

    monkeypatch.setattr(lora_worker, "SPIN_S", 1e-4)  # sleeps soon after a job
    gen = torch.Generator().manual_seed(2)
    ranks = np.array([3, 0, 8, 1], dtype=np.int64)
    a, b = slot_tensors(ranks, gen)
    worker = lora_worker.LoraWorker()
    try:
        for rows, count in (([0, 2, 3, 0, 2], 3), ([2, NO_SLOT, 3, 3], 1), ([0, 1, 2, 3], 2)):
            x = torch.randn(len(rows), IN, generator=gen)
            runs = SlotRuns.build(Routes.per_token(per_token(rows, 1)), RUN)
            ahead, _ = runs.split(count)
            want = torch.zeros(len(rows), OUT)
            kernels.lora_runs(want, x, a.numpy(), b.numpy(), ranks, ahead)
            got = torch.full((len(rows), OUT), float("nan"))
            worker.submit(got, x, a.numpy(), b.numpy(), ranks, runs, count)
            worker.wait()
            assert torch.equal(got, want)
            deadline = time.monotonic() + 5
            while not kernels.load(worker._ctrl, lora_worker.SLEEPING) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert kernels.load(worker._ctrl, lora_worker.SLEEPING), "the idle worker should sleep"
    finally:
        worker.close()
    assert not worker._thread.is_alive()


def test_an_idle_worker_sleeps_after_its_time_however_slowly_its_core_comes_back(monkeypatch):
    """The worker's idle spin is bounded in wall time, not in checks: on a busy machine each sched_yield can
    give its core away for a time slice, and a count of checks calibrated on an idle moment kept a CI run's
    worker spinning for over 5 s. Here giving way takes 20 ms (a slow core): the worker still sleeps after its
    first idle check past SPIN_S, instead of after as many checks as fit in SPIN_S on a quiet core."""
    import ctypes
    import time

    from server.layers import lora_worker

    calls = []

    @ctypes.CFUNCTYPE(ctypes.c_int)
    def slow_give_way():
        calls.append(1)
        time.sleep(0.02)
        return 0

    monkeypatch.setattr(lora_worker, "SPIN_S", 1e-4)
    monkeypatch.setattr(kernels, "_give_way", lambda: slow_give_way)
    worker = lora_worker.LoraWorker()
    try:
        deadline = time.monotonic() + 30
        while not kernels.load(worker._ctrl, lora_worker.SLEEPING) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert kernels.load(worker._ctrl, lora_worker.SLEEPING), "the idle worker should sleep"
        assert 1 <= len(calls) <= 2, f"{len(calls)} idle checks before sleeping"
    finally:
        worker.close()
    assert not worker._thread.is_alive()


def test_a_job_the_worker_has_not_started_is_taken_back():
    """The step thread never waits on a worker that is not running: a job still unclaimed when it waits (here:
    the worker thread is gone) runs on the waiting thread, with the same result."""
    from server.layers.lora_worker import LoraWorker

    gen = torch.Generator().manual_seed(3)
    ranks = np.array([3, 0, 8, 1], dtype=np.int64)
    a, b = slot_tensors(ranks, gen)
    worker = LoraWorker()
    worker.close()
    x = torch.randn(4, IN, generator=gen)
    runs = SlotRuns.build(Routes.per_token(per_token([0, 2, 3, 2], 1)), RUN)
    want = torch.zeros(4, OUT)
    kernels.lora_runs(want, x, a.numpy(), b.numpy(), ranks, runs)
    got = torch.full((4, OUT), float("nan"))
    worker.submit(got, x, a.numpy(), b.numpy(), ranks, runs, len(runs.slots))
    worker.wait()
    assert torch.equal(got, want) and not worker.finished()


def test_lora_worker_refuses_arrays_it_cannot_address():
    from server.layers.lora_worker import LoraWorker

    worker = LoraWorker()
    try:
        a = np.zeros((SLOTS, MAX_RANK, 2 * IN), np.float32)[:, :, ::2]  # a strided view
        runs = SlotRuns.build(Routes.per_token(per_token([0], 1)), RUN)
        with pytest.raises(ValueError, match="C-contiguous"):
            worker.submit(torch.zeros(1, OUT), torch.zeros(1, IN), a, np.zeros((SLOTS, MAX_RANK, OUT), np.float32),
                          np.ones(SLOTS, np.int64), runs, 1)
    finally:
        worker.close()


def test_kernel_reads_slot_tensors_in_place():
    """The layer hands the kernel numpy views of its slot tensors once; a later slot fill must be seen."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.zeros(SLOTS, MAX_RANK, IN), torch.zeros(SLOTS, MAX_RANK, OUT)
    a_np, b_np = a.numpy(), b.numpy()
    ranks = np.array([2, 0, 0, 0], dtype=np.int64)
    x, y = torch.randn(2, IN, generator=gen), torch.zeros(2, OUT)
    runs = SlotRuns.build(Routes.per_token(per_token([0, 0], 1)), RUN)
    kernels.lora_runs(y, x, a_np, b_np, ranks, runs)
    assert torch.equal(y, torch.zeros(2, OUT))
    a[0, :2].copy_(torch.randn(2, IN, generator=gen))  # a slot fill: copy_ into the same storage
    b[0, :2].copy_(torch.randn(2, OUT, generator=gen))
    kernels.lora_runs(y, x, a_np, b_np, ranks, runs)
    torch.testing.assert_close(y, x @ a[0, :2].T @ b[0, :2], rtol=1e-5, atol=1e-5)


def test_lora_backend_choice():
    """--lora-kernel: auto takes the kernel where it applies (float32 on CPU), torch never, numba or a clear error;
    --lora-overlap: auto adds the worker when a core is left beside torch's threads."""
    from server.layers import lora_backend

    cpu = torch.device("cpu")
    auto = lora_backend.choose("auto", "off", cpu, torch.float32, threads=1, cores=2)
    assert auto.name == "numba" and auto.max_run == kernels.max_run(1) and auto.worker is None
    assert lora_backend.choose("auto", "auto", cpu, torch.float32, threads=1, cores=2).worker is not None
    assert lora_backend.choose("auto", "auto", cpu, torch.float32, threads=2, cores=2).worker is None
    assert lora_backend.choose("reference", "auto", cpu, torch.float32, threads=1, cores=2).name == "reference"
    assert lora_backend.choose("auto", "auto", cpu, torch.bfloat16, 1, 2).name == "reference"  # numpy: no bfloat16
    with pytest.raises(ValueError, match="--lora-kernel numba needs float32 on CPU"):
        lora_backend.choose("numba", "auto", cpu, torch.bfloat16, 1, 2)
    with pytest.raises(ValueError, match="--lora-overlap on needs the compiled CPU LoRA kernel"):
        lora_backend.choose("reference", "on", cpu, torch.float32, 1, 2)
