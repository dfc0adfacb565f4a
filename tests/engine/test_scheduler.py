"""Scheduler + BlockManager: who computes how many tokens each step, in which KV blocks. Pure Python: requests
with fake adapters and a fake KV cache that records the token written in every slot, so blocks, prefix sharing
and preemption are checked by content (every running request finds its own tokens in its blocks), not by calls."""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

from server.engine.block_manager import BlockManager
from server.engine.block_pool import NULL_BLOCK, BlockPool
from server.engine.request import AdapterUse, Request, RequestStatus, SamplingParams
from server.engine.scheduler import Scheduler
from server.errors import QueueFullError

_ids = itertools.count()
BS = 4  # block size


def req(adapter: str | None = None, prompt_len: int = 4, name: str | None = None, prompt=None,
        identity: bytes | None = None) -> Request:
    uses = () if adapter is None else (AdapterUse(adapter, SimpleNamespace(key=(adapter, 0))),)
    r = Request(name or f"q{next(_ids)}", list(prompt or range(1, prompt_len + 1)), SamplingParams(), uses)
    r.prefix_identity = identity if identity is not None else (adapter or "").encode()
    return r


def always(_req) -> bool:
    return True


def sched(max_num_seqs=4, max_loras=4, budget=1000, max_waiting=100, blocks=1000, caching=True, **kw):
    manager = BlockManager(BlockPool(blocks, caching), BS)
    return Scheduler(manager, max_num_seqs, max_loras, budget, max_waiting, **kw)


class FakeKV:
    """slot -> the token whose KV was written there."""

    def __init__(self, s: Scheduler):
        self.s, self.slots = s, {}

    def write(self, r: Request, start: int, n: int) -> None:
        pool = self.s.blocks.pool
        for p in range(start, start + n):
            block = r.block_ids[p // BS]
            assert block != NULL_BLOCK, "the null block is never written"
            assert pool.ref[block] == 1, f"{r.request_id} writes into block {block} that others share"
            self.slots[block * BS + p % BS] = r.token_slice(p, p + 1)[0]

    def check(self) -> None:
        for r in self.s.running:
            held = [self.slots.get(r.block_ids[p // BS] * BS + p % BS) for p in range(r.num_computed_tokens)]
            assert held == r.all_token_ids[:r.num_computed_tokens], f"{r.request_id}: its blocks hold other tokens"


def run_step(s: Scheduler, kv: FakeKV, ready=always, limits: dict | None = None):
    """One engine step on the fake KV: write the scheduled tokens, advance, sample a token for each request that
    reached its end, finish those at their limit."""
    batch = s.schedule(ready)
    assert batch.num_tokens <= s.token_budget
    assert len({id(r) for r, _ in batch.seqs}) == len(batch.seqs)
    for r, n in batch.seqs:
        kv.write(r, r.num_computed_tokens, n)
    for r, n in batch.seqs:
        r.num_computed_tokens += n
        s.blocks.commit(r)
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(1000 + len(r.output_token_ids))
            if len(r.output_token_ids) >= (limits or {}).get(r.request_id, 10**9):
                s.finish(r)
    kv.check()
    return batch


def test_fcfs_admission_bounded_by_max_num_seqs():
    s = sched(max_num_seqs=3)
    reqs = [req() for _ in range(5)]
    s.waiting.extend(reqs)
    batch = s.schedule(always)
    assert [r for r, _ in batch.seqs] == reqs[:3] and list(s.waiting) == reqs[3:]
    assert all(r.status is RequestStatus.RUNNING for r in reqs[:3])


def test_decodes_first_then_chunks_within_the_token_budget():
    """A long prompt is cut into chunks that share each step with the running decodes; the step's tokens never
    pass the budget and the decodes never wait."""
    s = sched(budget=10)
    kv = FakeKV(s)
    short = [req(prompt_len=3) for _ in range(3)]
    s.waiting.extend(short)
    run_step(s, kv)
    long = req(prompt_len=30, name="long")
    s.waiting.append(long)
    chunks = []
    while long.num_computed_tokens < 30:
        batch = run_step(s, kv)
        decoded = [r for r, n in batch.seqs if r in short]
        assert decoded == short, "every running stream gets its token each step"
        chunks.append(dict((r.request_id, n) for r, n in batch.seqs)["long"])
    assert chunks == [7, 7, 7, 7, 2]  # 10 - 3 decodes, then the rest
    assert len(long.output_token_ids) == 1  # sampled once, after its last chunk


@pytest.mark.parametrize("threshold", [0, 6])
def test_long_prefill_threshold_lets_later_arrivals_start_beside_a_long_prompt(threshold):
    """vLLM's --long-prefill-token-threshold: a long prompt computes at most the threshold a step, so short
    prompts sent after it start in its first step instead of waiting for its whole prefill; without it the
    long prompt takes the whole budget until it is done. Contents stay right either way (FakeKV.check)."""
    s = sched(budget=10, long_prefill_threshold=threshold)
    kv = FakeKV(s)
    long = req(prompt_len=30, name="long")
    shorts = [req(prompt_len=2, name=f"s{i}") for i in range(2)]
    s.waiting.extend([long, *shorts])
    steps = []
    while long.num_computed_tokens < 30:
        steps.append(dict((r.request_id, n) for r, n in run_step(s, kv).seqs))
        assert sum(steps[-1].values()) <= 10
    if threshold:
        assert steps[0] == {"long": 6, "s0": 2, "s1": 2}  # the shorts start in the long prompt's first step
        assert all(step["long"] <= 6 for step in steps) and len(steps) == 5
        assert steps[1] == {"s0": 1, "s1": 1, "long": 6}  # then decode beside it
    else:
        assert steps == [{"long": 10}, {"long": 10}, {"long": 10}]
        assert all(r.num_computed_tokens == 0 for r in shorts)  # still waiting behind it
    assert [len(r.output_token_ids) for r in shorts] == ([len(steps)] * 2 if threshold else [0, 0])


def test_budget_smaller_than_a_prompt_still_runs_it():
    s = sched(budget=8)
    kv = FakeKV(s)
    r = req(prompt_len=21)
    s.waiting.append(r)
    steps = 0
    while not r.output_token_ids:
        run_step(s, kv)
        steps += 1
    assert steps == 3


def test_at_most_max_loras_adapters_per_step_and_others_pass():
    s = sched(max_num_seqs=8, max_loras=2)
    reqs = [req("A"), req("B"), req("C"), req(None), req("A")]
    s.waiting.extend(reqs)
    batch = s.schedule(always)
    assert [r.adapter for r, _ in batch.seqs] == ["A", "B", None, "A"]
    assert list(s.waiting) == [reqs[2]] and reqs[2].skipped == 1


def test_waiting_adapter_admitted_once_a_slot_frees():
    s = sched(max_num_seqs=8, max_loras=1)
    kv = FakeKV(s)
    a, b = req("A"), req("B")
    s.waiting.extend([a, b])
    run_step(s, kv)
    assert s.running == [a]
    s.finish(a)
    batch = run_step(s, kv)
    assert [r for r, _ in batch.seqs] == [b]


def test_adapter_still_loading_is_passed_over_then_admitted():
    s = sched()
    kv = FakeKV(s)
    loading, ready = req("slow"), req("fast")
    s.waiting.extend([loading, ready])
    done = set()
    run_step(s, kv, ready=lambda r: r.adapter != "slow" or "slow" in done)
    assert s.running == [ready] and list(s.waiting) == [loading]
    done.add("slow")
    run_step(s, kv, ready=lambda r: r.adapter != "slow" or "slow" in done)
    assert loading in s.running


def test_starvation_guard_blocks_later_arrivals_until_the_starved_request_runs():
    s = sched(max_num_seqs=8, max_loras=1, starvation_steps=3)
    kv = FakeKV(s)
    s.waiting.append(req("A", name="a0"))
    run_step(s, kv)
    starved = req("B", name="starved")
    s.waiting.append(starved)
    admitted_after_guard = []
    for step in range(10):
        if step < 6:
            s.waiting.append(req("A"))
        batch = run_step(s, kv)
        if starved.skipped >= 3:
            admitted_after_guard += [r for r, _ in batch.seqs if r.adapter == "A" and r.num_computed_tokens
                                     == r.num_tokens and len(r.output_token_ids) == 1 and r is not starved]
        if step == 6:
            for r in list(s.running):
                s.finish(r)  # the A stream drains
        if starved.status is RequestStatus.RUNNING:
            break
    assert starved.status is RequestStatus.RUNNING and starved.skipped >= 3
    assert admitted_after_guard == []  # once starved, nothing behind it was let in


def test_scheduler_add_bounds_the_waiting_queue():
    s = sched(max_num_seqs=1, max_loras=1, max_waiting=2)
    s.add(req())
    s.add(req())
    with pytest.raises(QueueFullError):
        s.add(req())
    s.schedule(always)
    s.add(req())  # room again once one was admitted


def test_finish_frees_blocks_wherever_the_request_is():
    s = sched(blocks=20)
    kv = FakeKV(s)
    running, waiting = req(prompt_len=9), req(prompt_len=5)
    s.waiting.append(running)
    run_step(s, kv)
    s.waiting.append(waiting)
    s.finish(running)
    s.finish(waiting)
    assert not s.has_work and s.blocks.pool.num_free == 19
    assert running.status is waiting.status is RequestStatus.FINISHED


# ---------------------------------------------------------------- prefix caching

def test_shared_prefix_is_computed_once_and_blocks_are_shared():
    s = sched()
    kv = FakeKV(s)
    system = list(range(100, 113))  # 13 tokens: 3 full blocks
    first = req(prompt=system + [1, 2])
    s.waiting.append(first)
    run_step(s, kv)
    second = req(prompt=system + [7])
    s.waiting.append(second)
    batch = run_step(s, kv)
    assert second.num_cached_tokens == 12 and dict((r.request_id, n) for r, n in batch.seqs)[second.request_id] == 2
    assert second.block_ids[:3] == first.block_ids[:3]
    assert batch.prefix_queries == 14 and batch.prefix_hits == 12


def test_fully_cached_prompt_still_computes_its_last_token():
    s = sched()
    kv = FakeKV(s)
    prompt = list(range(50, 58))  # exactly two blocks
    a = req(prompt=prompt)
    s.waiting.append(a)
    run_step(s, kv)
    b = req(prompt=prompt)
    s.waiting.append(b)
    batch = run_step(s, kv)
    assert b.num_cached_tokens == 4  # the second block is recomputed: its last token's logits are needed
    assert dict((r.request_id, n) for r, n in batch.seqs)[b.request_id] == 4 and b.output_token_ids


@pytest.mark.parametrize("other", [dict(adapter=None, identity=b""), dict(adapter="A", identity=b"other weights")])
def test_prefix_blocks_are_keyed_by_adapter_content(other):
    """Adapter A's KV is never reused by the base model, nor by A's name reloaded with other weights."""
    s = sched()
    kv = FakeKV(s)
    prompt = list(range(10, 30))
    s.waiting.append(req("A", prompt=prompt, identity=b"weights v1"))
    run_step(s, kv)
    second = req(prompt=prompt, **other)
    s.waiting.append(second)
    run_step(s, kv)
    assert second.num_cached_tokens == 0
    same = req("A2", prompt=prompt, identity=b"weights v1")  # another name, the same content: shared
    s.waiting.append(same)
    run_step(s, kv)
    assert same.num_cached_tokens == 16


def served(s: Scheduler, kv: FakeKV, prompt: list[int]) -> Request:
    """A request on ``prompt`` admitted alone, prefilled in one step, then finished (its blocks freed)."""
    r = req(prompt=prompt)
    s.waiting.append(r)
    run_step(s, kv)
    s.finish(r)
    return r


def test_freed_blocks_stay_cached_until_evicted_lru():
    s = sched(blocks=7)  # 6 usable blocks of 4
    kv = FakeKV(s)
    served(s, kv, list(range(1, 10)))  # 3 blocks
    assert served(s, kv, list(range(1, 10))).num_cached_tokens == 8
    served(s, kv, list(range(200, 223)))  # 6 blocks: takes every block, evicting the first prompt's
    assert served(s, kv, list(range(1, 10))).num_cached_tokens == 0


def test_no_caching_shares_nothing():
    s = sched(caching=False)
    kv = FakeKV(s)
    for _ in range(2):
        r = req(prompt=list(range(1, 20)))
        s.waiting.append(r)
        run_step(s, kv)
        assert r.num_cached_tokens == 0


# ---------------------------------------------------------------- preemption

def test_newest_running_request_is_preempted_and_recomputed_when_blocks_run_out():
    s = sched(blocks=9, budget=100)  # 8 usable blocks = 32 tokens
    kv = FakeKV(s)
    old, new = req(prompt_len=12, name="old"), req(prompt_len=12, name="new")  # 3 blocks each
    s.waiting.extend([old, new])
    preempted = []
    limits = {"old": 14, "new": 14}
    for _ in range(60):
        batch = run_step(s, kv, limits=limits)
        preempted += batch.preempted
        if not s.has_work:
            break
    assert preempted and preempted[0] is new and new.num_preemptions >= 1 and old.num_preemptions == 0
    assert old.output_token_ids == [1000 + i for i in range(14)]
    assert new.output_token_ids == [1000 + i for i in range(14)]  # its output survives the recompute


def test_admission_never_preempts():
    s = sched(blocks=5, budget=100)  # 4 usable blocks
    kv = FakeKV(s)
    a = req(prompt_len=12)
    s.waiting.append(a)
    run_step(s, kv)
    b = req(prompt_len=8)
    s.waiting.append(b)
    batch = run_step(s, kv)
    assert not batch.preempted and list(s.waiting) == [b] and a in s.running


@pytest.mark.parametrize("seed", range(4))
def test_random_traffic_invariants(seed):
    """Random arrivals, adapters, shared prefixes, lengths and loading delays over a small pool: a step never
    holds more than max_num_seqs sequences, max_loras adapters or budget tokens, every running request finds its
    tokens in its blocks (shared ones included), and every request finishes with its full output."""
    rng = random.Random(seed)
    s = sched(max_num_seqs=4, max_loras=2, budget=16, blocks=12, starvation_steps=5)  # 11 blocks: preempts
    kv = FakeKV(s)
    limits, ready_at, all_reqs, preempted, hits = {}, {}, [], 0, 0
    prefixes = [list(range(300, 300 + n)) for n in (0, 5, 9)]
    step = 0
    for step in range(2000):
        if step < 150 and rng.random() < 0.5:
            adapter = rng.choice([None, "A", "B", "C"])
            prompt = rng.choice(prefixes) + [rng.randint(1, 50) for _ in range(rng.randint(1, 12))]
            r = req(adapter, prompt=prompt)
            limits[r.request_id] = rng.randint(1, 12)
            ready_at[r.request_id] = step + rng.choice([0, 0, 0, 3])
            s.waiting.append(r)
            all_reqs.append(r)
        batch = run_step(s, kv, ready=lambda r: step >= ready_at[r.request_id], limits=limits)
        assert len(batch.seqs) <= 4 and len(s.running) <= 4
        assert len({r.adapter for r, _ in batch.seqs if r.adapter}) <= 2
        preempted, hits = preempted + len(batch.preempted), hits + batch.prefix_hits
        if step >= 150 and not s.has_work:
            break
    assert not s.has_work, f"still busy after {step} steps"
    assert preempted and hits, "the traffic must exercise preemption and prefix hits"
    assert all(r.output_token_ids == [1000 + i for i in range(limits[r.request_id])] for r in all_reqs)
    assert s.blocks.pool.num_free == 11  # every block came back
