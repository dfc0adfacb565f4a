"""Scheduler: who runs each step. Pure Python: requests with fake adapters, a fake KV cache (one list per row)
so row compaction is checked by content, not by calls."""
from __future__ import annotations

import itertools
import random

import pytest

from server.engine.request import Request, RequestStatus, SamplingParams
from server.engine.scheduler import Scheduler
from server.errors import QueueFullError

_ids = itertools.count()


def req(adapter: str | None = None, prompt_len: int = 4, name: str | None = None) -> Request:
    return Request(name or f"q{next(_ids)}", list(range(1, prompt_len + 1)), SamplingParams(), adapter)


def always(_req) -> bool:
    return True


class FakeKV:
    """rows[i] holds the tokens written for the sequence in row i (what a real KV row would hold)."""

    def __init__(self):
        self.rows: dict[int, list[int]] = {}

    def move_row(self, src: int, dst: int, length: int) -> None:
        self.rows[dst] = list(self.rows[src][:length])


def run_step(s: Scheduler, kv: FakeKV, ready=always, max_tokens: dict | None = None):
    """One engine step against the fake KV: decode rows append a token, prefill rows write their prompt,
    requests reaching their max_tokens finish and their rows are compacted."""
    batch = s.schedule(ready)
    for row, r in enumerate(batch.decode):
        kv.rows[row].append(r.output_token_ids[-1])
    for i, r in enumerate(batch.prefill):
        kv.rows[len(batch.decode) + i] = list(r.prompt_token_ids)
    for r in batch.decode + batch.prefill:
        r.output_token_ids.append(1000 + len(r.output_token_ids))
    limits = max_tokens or {}
    done = [i for i, r in enumerate(s.running) if len(r.output_token_ids) >= limits.get(r.request_id, 10**9)]
    s.finish_rows(done, kv.move_row)
    return batch, done


def check_rows(s: Scheduler, kv: FakeKV) -> None:
    for row, r in enumerate(s.running):  # every running request finds its own tokens in its row
        assert kv.rows[row][:r.num_tokens - 1] == r.all_token_ids[:-1]


def test_fcfs_admission_bounded_by_max_num_seqs():
    s = Scheduler(max_num_seqs=3, max_loras=4, max_num_batched_tokens=1000, max_waiting=10)
    reqs = [req() for _ in range(5)]
    s.waiting.extend(reqs)
    batch = s.schedule(always)
    assert batch.decode == [] and batch.prefill == reqs[:3]
    assert s.running == reqs[:3] and list(s.waiting) == reqs[3:]
    assert all(r.status is RequestStatus.RUNNING for r in reqs[:3])
    batch = s.schedule(always)
    assert batch.decode == reqs[:3] and batch.prefill == []  # running ones always decode, nobody else fits


def test_joins_take_the_rows_after_the_decoding_ones():
    s = Scheduler(4, 4, 1000, 10)
    a, b = req(), req()
    s.waiting.append(a)
    s.schedule(always)
    s.waiting.append(b)
    batch = s.schedule(always)
    assert batch.decode == [a] and batch.prefill == [b]
    assert s.running == [a, b]


def test_at_most_max_loras_adapters_per_step_and_others_pass():
    s = Scheduler(max_num_seqs=8, max_loras=2, max_num_batched_tokens=1000, max_waiting=10)
    a, b, c, base, a2 = req("A"), req("B"), req("C"), req(None), req("A")
    s.waiting.extend([a, b, c, base, a2])
    batch = s.schedule(always)
    assert batch.prefill == [a, b, base, a2]  # C has no slot; base and A (already active) go past it
    assert list(s.waiting) == [c] and c.skipped == 1
    assert len({r.adapter for r in s.running if r.adapter}) == 2


def test_waiting_adapter_admitted_once_a_slot_frees():
    s, kv = Scheduler(8, 2, 1000, 10), FakeKV()
    a, b, c = req("A", name="a"), req("B", name="b"), req("C", name="c")
    s.waiting.extend([a, b, c])
    steps = 0
    while c.status is not RequestStatus.RUNNING:
        batch, _ = run_step(s, kv, max_tokens={"a": 3, "b": 8})
        steps += 1
        assert len({r.adapter for r in batch.decode + batch.prefill if r.adapter}) <= 2
        assert steps < 10
    assert steps == 4  # a finished at the end of step 3, c prefilled in step 4
    assert s.running == [b, c]
    check_rows(s, kv)


def test_adapter_still_loading_is_passed_over_then_admitted():
    s = Scheduler(4, 2, 1000, 10)
    cold, warm = req("cold"), req("warm")
    s.waiting.extend([cold, warm])
    loaded = {"warm"}
    batch = s.schedule(lambda r: r.adapter in loaded)
    assert batch.prefill == [warm] and list(s.waiting) == [cold]
    assert cold.skipped == 0  # loading is not "no slot": the starvation guard does not count it
    loaded.add("cold")
    assert s.schedule(lambda r: r.adapter in loaded).prefill == [cold]


def test_prefill_token_budget_is_fcfs():
    s = Scheduler(max_num_seqs=8, max_loras=4, max_num_batched_tokens=10, max_waiting=10)
    big, small1, small2 = req(prompt_len=7), req(prompt_len=6), req(prompt_len=2)
    s.waiting.extend([big, small1, small2])
    assert s.schedule(always).prefill == [big]  # 7 + 6 > 10; small2 may not jump the queue
    assert s.schedule(always).prefill == [small1, small2]


def test_oversized_prompt_still_runs_alone():
    s = Scheduler(8, 4, max_num_batched_tokens=5, max_waiting=10)
    huge, other = req(prompt_len=20), req(prompt_len=1)
    s.waiting.extend([huge, other])
    assert s.schedule(always).prefill == [huge]
    assert s.schedule(always).prefill == [other]


def test_starvation_guard_blocks_later_arrivals_until_the_starved_request_runs():
    s, kv = Scheduler(max_num_seqs=8, max_loras=2, max_num_batched_tokens=1000, max_waiting=100,
                      starvation_steps=3), FakeKV()
    limits = {}
    s.waiting.extend([req("A", name="a0"), req("B", name="b0")])
    limits.update(a0=4, b0=4)
    starved = req("C", name="c")
    s.waiting.append(starved)
    admitted_after_guard = []
    for step in range(30):
        late = req("A", name=f"a{step + 1}")  # a steady stream that would keep adapter A busy forever
        limits[late.request_id] = 4
        s.waiting.append(late)
        batch, _ = run_step(s, kv, max_tokens=limits)
        if starved.skipped >= 3 and starved.status is RequestStatus.WAITING:
            admitted_after_guard += [r for r in batch.prefill if r.adapter == "A"]
        check_rows(s, kv)
        if starved.status is not RequestStatus.WAITING:
            break
    assert starved.status is not RequestStatus.WAITING  # it ran: no starvation
    assert starved.skipped >= 3
    assert admitted_after_guard == []  # once starved, nothing behind it was let in


def test_finish_rows_keeps_rows_dense_and_contents_right():
    s, kv = Scheduler(6, 6, 1000, 10), FakeKV()
    reqs = [req(prompt_len=2 + i, name=f"r{i}") for i in range(6)]
    s.waiting.extend(reqs)
    for _ in range(3):
        run_step(s, kv)
    check_rows(s, kv)
    s.finish_rows([0, 2, 5], kv.move_row)
    assert len(s.running) == 3
    assert {r.request_id for r in s.running} == {"r1", "r3", "r4"}
    assert all(reqs[i].status is RequestStatus.FINISHED for i in (0, 2, 5))
    check_rows(s, kv)
    run_step(s, kv)  # and decoding continues on the moved rows
    check_rows(s, kv)


def test_scheduler_add_bounds_the_waiting_queue():
    s = Scheduler(1, 1, 100, max_waiting=2)
    s.add(req())
    s.add(req())
    with pytest.raises(QueueFullError):
        s.add(req())
    s.schedule(always)
    s.add(req())  # room again once one was admitted


def test_remove_waiting():
    s = Scheduler(1, 1, 100, 10)
    r = req()
    s.waiting.append(r)
    s.remove_waiting(r)
    assert not s.has_work and r.status is RequestStatus.FINISHED


@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_invariants(seed):
    """Random arrivals, adapters, lengths and loading delays: rows never exceed max_num_seqs, a step never holds
    more than max_loras adapters, rows stay consistent, and every request eventually finishes."""
    rng = random.Random(seed)
    s, kv = Scheduler(max_num_seqs=4, max_loras=2, max_num_batched_tokens=16, max_waiting=1000,
                      starvation_steps=5), FakeKV()
    limits, ready_at, arrived, all_reqs = {}, {}, {}, []
    step = 0
    for step in range(400):
        if step < 120 and rng.random() < 0.6:
            r = req(rng.choice([None, "A", "B", "C", "D"]), prompt_len=rng.randint(1, 9))
            limits[r.request_id] = rng.randint(1, 6)
            ready_at[r.request_id] = step + rng.choice([0, 0, 0, 3])
            arrived[r.request_id] = step
            s.waiting.append(r)
            all_reqs.append(r)
        batch, _ = run_step(s, kv, ready=lambda r: step >= ready_at[r.request_id], max_tokens=limits)
        rows = batch.decode + batch.prefill
        assert len(rows) <= 4
        assert len({r.adapter for r in rows if r.adapter}) <= 2
        check_rows(s, kv)
        if step >= 120 and not s.has_work:
            break
    assert not s.has_work, f"still waiting after {step} steps: {[r.adapter for r in s.waiting]}"
    assert all(len(r.output_token_ids) == limits[r.request_id] for r in all_reqs)
