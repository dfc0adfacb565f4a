"""Device slots through LLMEngine steps: LRU walked step by step, pinning, a request waiting for a slot, a
join never evicting an adapter of the same step, and cancellation freeing row and adapter."""
from __future__ import annotations

from .helpers import drain, encode, run_alone, step, submit


def keys(eng) -> list[str]:
    """The names holding each slot's version (one name per content here), LRU order, oldest first."""
    return [",".join(sorted(eng.store.versions[k].names)) for k in eng.runner.manager.slot_of]


def test_device_lru_walked_step_by_step(fresh_llm, oracle):
    eng = fresh_llm(max_loras=2)
    manager = eng.runner.manager
    prompt = encode(eng, "The quick")
    assert keys(eng) == []
    a = submit(eng, prompt, "lora", max_tokens=2)
    step(eng)
    assert keys(eng) == ["lora"] and manager.loads == 1
    step(eng)
    assert a.finish_reason == "length" and not eng.scheduler.has_work
    assert keys(eng) == ["lora"]  # finished adapters stay resident (cached)
    run_alone(eng, prompt, "dora", max_tokens=2)
    assert keys(eng) == ["lora", "dora"] and manager.loads == 2
    again = run_alone(eng, prompt, "lora", max_tokens=3)
    assert keys(eng) == ["dora", "lora"] and manager.loads == 2  # a hit: reused, moved to most recent
    assert again.output_token_ids == oracle.greedy("lora", prompt, 3)[0]
    c = run_alone(eng, prompt, "ia3", max_tokens=3)
    assert keys(eng) == ["lora", "ia3"] and manager.loads == 3  # dora was least recently used
    assert c.output_token_ids == oracle.greedy("ia3", prompt, 3)[0]
    b = run_alone(eng, prompt, "dora", max_tokens=3)  # back into the slot lora just left
    assert keys(eng) == ["ia3", "dora"] and manager.loads == 4
    assert b.output_token_ids == oracle.greedy("dora", prompt, 3)[0]
    base = run_alone(eng, prompt, None, max_tokens=3)
    assert keys(eng) == ["ia3", "dora"]  # base rows use no slot
    assert base.output_token_ids == oracle.greedy(None, prompt, 3)[0]


def test_pinned_adapter_stays_resident(fresh_llm, root, oracle):
    eng = fresh_llm(max_loras=2)
    manager = eng.runner.manager
    keep = eng.store.register("keep", str(root / "lora2"), pinned=True)
    prompt = encode(eng, "Berlin is")
    run_alone(eng, prompt, "keep", max_tokens=2)
    assert keys(eng) == ["keep"] and keep.key in manager.pinned
    for kind in ("lora", "dora", "ia3", "rslora"):
        req = submit(eng, prompt, kind, max_tokens=3)
        for _ in range(3):
            step(eng)
            assert keep.key in manager.slot_of  # though least recently used, it is never the victim
        assert req.finish_reason == "length"
        assert req.output_token_ids == oracle.greedy(kind, prompt, 3)[0]
        assert keys(eng) == ["keep", kind]
    assert manager.loads == 5  # keep loaded once
    again = run_alone(eng, prompt, "keep", max_tokens=4)
    assert manager.loads == 5 and again.output_token_ids == oracle.greedy("lora2", prompt, 4)[0]


def test_request_without_a_slot_waits_then_runs(fresh_llm, oracle):
    eng = fresh_llm(max_loras=2, max_num_seqs=4)
    p = encode(eng, "hello world")
    a = submit(eng, p, "lora", max_tokens=6)
    b = submit(eng, p, "dora", max_tokens=10)
    c = submit(eng, p, "ia3", max_tokens=3)  # a third adapter: no slot while lora and dora run
    base = submit(eng, p, None, max_tokens=3)  # behind it, needs no slot: not held up
    a2 = submit(eng, encode(eng, "Paris"), "lora", max_tokens=2)  # behind it, its adapter is active: not held up
    admitted_at = {}
    for n in range(1, 30):
        step(eng)
        for r in (a, b, c, base, a2):
            if r.output_token_ids and r.request_id not in admitted_at:
                admitted_at[r.request_id] = n
        if c.output_token_ids == [] and a.finish_reason is None:
            assert set(keys(eng)) == {"lora", "dora"}
        if not eng.scheduler.has_work:
            break
    assert not eng.scheduler.has_work
    assert admitted_at[base.request_id] == 1 and admitted_at[a2.request_id] == 1
    assert admitted_at[c.request_id] == 7  # lora's last row (a) finished at step 6; c runs in the very next
    assert "lora" not in keys(eng) and set(keys(eng)) == {"dora", "ia3"}
    for r, kind in ((a, "lora"), (b, "dora"), (c, "ia3"), (base, None), (a2, "lora")):
        assert r.output_token_ids == oracle.greedy(kind, r.prompt_token_ids, r.params.max_tokens)[0]


def test_join_never_evicts_an_adapter_running_in_the_same_step(fresh_llm, root):
    eng = fresh_llm(max_loras=2)
    eng.store.register("keep", str(root / "lora2"), pinned=True)
    run_alone(eng, [5, 6, 7], "keep", max_tokens=2)
    submit(eng, [5, 6, 7], "lora", max_tokens=6)
    step(eng, strict_slots=False)
    submit(eng, [5, 6, 7], "dora", max_tokens=4)
    step(eng, strict_slots=False)  # lora decodes, dora prefills: the idle pinned 'keep' must make room
    assert set(keys(eng)) == {"lora", "dora"}
    drain(eng, strict_slots=False)
    assert eng.runner.manager.loads == 3


def test_abort_frees_row_and_adapter_at_next_step(fresh_llm, oracle):
    eng = fresh_llm(max_loras=2, max_num_seqs=3)
    p = encode(eng, "The quick brown")
    a = submit(eng, p, "lora", max_tokens=12)
    b = submit(eng, p, None, max_tokens=12)
    c = submit(eng, p, "dora", max_tokens=12)
    waiting = submit(eng, p, "ia3", max_tokens=4)  # no slot and no row: waits
    late = submit(eng, encode(eng, "Paris"), None, max_tokens=5)  # no row: waits
    outputs: dict = {}
    for _ in range(3):
        step(eng, outputs)
    entries = {r.request_id: r.uses[0].entry for r in (a, c, waiting)}
    assert entries[a.request_id].in_flight == 1 and entries[waiting.request_id].in_flight == 1
    a.aborted = waiting.aborted = True  # what AsyncEngine.abort() sets
    step(eng, outputs)
    assert a.finish_reason == "abort" and waiting.finish_reason == "abort"
    assert outputs[a.request_id][-1].finish_reason == "abort" and outputs[a.request_id][-1].token_ids == []
    assert outputs[waiting.request_id] == [outputs[waiting.request_id][-1]]  # never ran; one final output
    assert entries[a.request_id].in_flight == 0 and entries[waiting.request_id].in_flight == 0
    assert a not in eng.scheduler.running and waiting not in eng.scheduler.waiting
    assert late in eng.scheduler.running and len(late.output_token_ids) == 1  # the freed row was reused at once
    assert len(a.output_token_ids) == 3
    drain(eng, outputs)
    for r, kind in ((b, None), (c, "dora"), (late, None)):  # the moved rows kept their cache
        assert r.output_token_ids == oracle.greedy(kind, r.prompt_token_ids, r.params.max_tokens)[0]
    assert entries[c.request_id].in_flight == 0
