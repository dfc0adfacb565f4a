"""AsyncEngine (its step thread, per-request queues): streaming, single-flight cold loads that do not stall
others, unload/replace during generation, early-exit consumers, aborts, validation and the queue bound."""
from __future__ import annotations

import asyncio
import gc
import threading

import pytest

import server.adapters.store as store_module
import support
from server.engine.request import SamplingParams
from server.errors import InvalidRequestError, QueueFullError, UnknownAdapterError
from .helpers import FFFD, Hold, Recorder, collect, config, encode, greedy, start, streamed, until, wait_event


def test_streaming_increments_concatenate_and_never_split_characters(loop, aengine):
    tok = aengine.tokenizer
    prompts = ["héllo wörld", "你好世界", "emoji 🙂", "The quick", "é你🙂", "Paris"]
    adapters = [None, "lora", "dora", None, "ia3", "lora"]

    async def main():
        streams = [aengine.add_request(tok.encode(p, add_special_tokens=False),
                                       SamplingParams(max_tokens=24, temperature=1.0, seed=i), a)
                   for i, (p, a) in enumerate(zip(prompts, adapters))]
        return await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 60)

    results = loop.run_until_complete(main())
    non_ascii = 0
    for outs in results:
        tokens, text = streamed(outs)
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        final = tok.decode(tokens if outs[-1].finish_reason == "length" else tokens[:-1], skip_special_tokens=True)
        assert text == final
        for o in outs:
            assert FFFD not in o.text or FFFD in final
        assert outs[-1].num_output_tokens == len(tokens)
        non_ascii += sum(1 for ch in final if not ch.isascii() and ch != FFFD)
    assert non_ascii > 0  # multi-byte characters were really produced


def test_single_flight_cold_load_and_it_does_not_stall_others(loop, aengine, observe, monkeypatch, oracle):
    rec = observe(Recorder())
    release, calls = threading.Event(), []
    original = store_module.AdapterStore._read

    def held(self, directory, name, *rest):
        calls.append(name)
        assert release.wait(30)
        return original(self, directory, name, *rest)

    monkeypatch.setattr(store_module.AdapterStore, "_read", held)
    p1, p2 = encode(aengine, "The quick"), encode(aengine, "Adapters")

    async def main():
        s1 = aengine.add_request(p1, greedy(6), "cold")
        s2 = aengine.add_request(p2, greedy(5), "cold")
        entry = aengine.engine.store.entries["cold"]
        first_future = entry.future
        base = await asyncio.wait_for(collect(aengine.add_request(p1, greedy(6))), 30)
        assert base[-1].finish_reason == "length"  # streamed to the end while "cold" was still loading
        assert calls == ["cold"] and not first_future.done() and entry.in_flight == 2
        assert aengine.stats()["waiting_adapters"] == ["cold"]
        release.set()
        outs = await asyncio.wait_for(asyncio.gather(collect(s1), collect(s2)), 30)
        return outs, entry, first_future

    (o1, o2), entry, fut = loop.run_until_complete(main())
    assert calls == ["cold"] and rec.count("load", "cold") == 1  # one load for two requests
    assert entry.future is fut
    assert streamed(o1)[0] == oracle.greedy("rslora", p1, 6)[0]
    assert streamed(o2)[0] == oracle.greedy("rslora", p2, 5)[0]
    assert entry.in_flight == 0


def test_cold_request_counts_one_miss(loop, aengine, observe, monkeypatch, root):
    rec = observe(Recorder())
    release = threading.Event()
    original = store_module.AdapterStore._read
    monkeypatch.setattr(store_module.AdapterStore, "_read", lambda *a: (release.wait(30), original(*a))[1])

    async def main():
        aengine.engine.store.register("misscount", str(root / "lora"))
        stream = aengine.add_request([5, 6, 7], greedy(2), "misscount")
        release.set()
        await asyncio.wait_for(collect(stream), 30)
        await aengine.unload_adapter("misscount")

    loop.run_until_complete(main())
    assert rec.count("miss", "misscount") == 1


def test_unload_during_generation_then_reload(loop, aengine, observe, oracle):
    manager, store = aengine.engine.runner.manager, aengine.engine.store
    p = encode(aengine, "The quick brown")
    hold = observe(Hold("u1", 3))

    async def main():
        info = await aengine.load_adapter("victim", "lora")
        old_key = store.entries["victim"].key  # the whole content hash: what slots are keyed by
        task = asyncio.ensure_future(collect(aengine.add_request(p, greedy(8), "victim", request_id="u1")))
        await wait_event(hold.reached)
        assert old_key in manager.slot_of
        await aengine.unload_adapter("victim")
        with pytest.raises(UnknownAdapterError):  # gone at once for new requests
            aengine.add_request(p, greedy(2), "victim")
        assert "victim" not in [a["name"] for a in aengine.list_adapters()]
        assert old_key in manager.slot_of  # the in-flight request still holds its weights on device
        hold.go.set()
        outs = await asyncio.wait_for(task, 30)
        assert streamed(outs)[0] == oracle.greedy("lora", p, 8)[0]  # finished on the old weights
        assert outs[-1].finish_reason == "length"
        assert not store.retired and old_key not in manager.pinned  # then freed (its slot too, unless another
        assert store.known(old_key) or old_key not in manager.slot_of  # name holds the same content)

        info2 = await aengine.load_adapter("victim", "lora2")  # reload under the same name, new weights
        key2 = store.entries["victim"].key
        assert info2["version"] != info["version"] and info2["tier"] == "host"
        outs = await asyncio.wait_for(collect(aengine.add_request(p, greedy(6), "victim")), 30)
        assert streamed(outs)[0] == oracle.greedy("lora2", p, 6)[0]
        await aengine.unload_adapter("victim")
        assert not store.known(key2)  # no other name holds lora2's content in this module
        await until(lambda: key2 not in manager.slot_of, what="idle unload to free the slot")

    loop.run_until_complete(main())


def test_replace_during_generation_serves_both_versions(loop, aengine, observe, oracle):
    p = encode(aengine, "héllo wörld")
    hold = observe(Hold("r1", 2))

    async def main():
        v1 = await aengine.load_adapter("swap", "ia3")
        old = asyncio.ensure_future(collect(aengine.add_request(p, greedy(7), "swap", request_id="r1")))
        await wait_event(hold.reached)
        v2 = await aengine.load_adapter("swap", "adalora", replace=True)
        assert v2["version"] != v1["version"]
        new = asyncio.ensure_future(collect(aengine.add_request(p, greedy(5), "swap")))
        hold.go.set()
        old_outs, new_outs = await asyncio.wait_for(asyncio.gather(old, new), 30)
        assert streamed(old_outs)[0] == oracle.greedy("ia3", p, 7)[0]
        assert streamed(new_outs)[0] == oracle.greedy("adalora", p, 5)[0]
        assert aengine.engine.store.version_list("swap") == [v1["version"], v2["version"]]  # swap@v1 stays
        await aengine.unload_adapter("swap")
        assert aengine.engine.store.version_list("swap") == []

    loop.run_until_complete(main())


def test_a_stream_names_the_versions_it_read_also_once_finished(loop, aengine):
    """The x-adapter-version header is read from the stream after adapter_loaded: a tiny request may be done by
    then, and the stream still says which version it read (and keeps saying so after the name is reloaded)."""
    async def main():
        await aengine.load_adapter("versioned", "lora")
        version = aengine.adapter_info("versioned")["version"]
        stream = aengine.add_request([5, 6, 7], greedy(2), "versioned")
        await aengine.adapter_loaded(stream.request_id)
        await asyncio.wait_for(collect(stream), 30)
        assert stream.request_id not in aengine._requests and stream.versions == [("versioned", version)]
        await aengine.load_adapter("versioned", "lora2", replace=True)
        reloaded = aengine.adapter_info("versioned")["version"]
        assert reloaded != version and stream.versions == [("versioned", version)]
        base = aengine.add_request([5, 6, 7], greedy(1))
        assert base.versions == []
        await asyncio.wait_for(collect(base), 30)
        await aengine.unload_adapter("versioned")

    loop.run_until_complete(main())


def test_generate_consumer_breaking_early_aborts(loop, aengine, observe):
    rec = observe(Recorder())
    hold = observe(Hold("g1", 2))

    async def main():
        async for out in aengine.generate([5, 6, 7, 8], greedy(100), "lora", request_id="g1"):
            assert out.token_ids
            break  # the client went away after the first increment
        await until(lambda: aengine._requests.get("g1") is None or aengine._requests["g1"][0].aborted,
                    what="abort after the consumer left")
        hold.go.set()
        await until(lambda: "g1" in rec.finished, what="the aborted request to leave")
        await until(lambda: aengine.stats()["num_running"] == 0, what="the row to be freed")

    loop.run_until_complete(main())
    req = rec.finished["g1"]
    assert req.finish_reason == "abort" and len(req.output_token_ids) <= 3
    assert next(a for a in aengine.list_adapters() if a["name"] == "lora")["in_flight"] == 0
    assert "g1" not in aengine._requests


def test_cancelled_consumer_task_aborts(loop, aengine, observe):
    rec = observe(Recorder())
    hold = observe(Hold("c1", 2))

    async def main():
        stream = aengine.add_request([9, 10, 11], greedy(100), "dora", request_id="c1")
        task = asyncio.ensure_future(collect(stream))
        await wait_event(hold.reached)
        task.cancel()  # e.g. the HTTP handler was cancelled on disconnect
        with pytest.raises(asyncio.CancelledError):
            await task
        hold.go.set()
        await until(lambda: "c1" in rec.finished, what="the cancelled request to leave")
        aengine.abort("c1")  # idempotent, also after it left
        aengine.abort("no-such-request")

    loop.run_until_complete(main())
    assert rec.finished["c1"].finish_reason == "abort"
    assert next(a for a in aengine.list_adapters() if a["name"] == "dora")["in_flight"] == 0


def test_abort_ends_the_stream_and_frees_the_row(loop, aengine, observe):
    hold = observe(Hold("a1", 2))
    store = aengine.engine.store

    async def main():
        stream = aengine.add_request([5, 6, 7], greedy(50), "ia3", request_id="a1")
        task = asyncio.ensure_future(collect(stream))
        await wait_event(hold.reached)
        assert aengine.stats()["num_running"] == 1 and store.entries["ia3"].in_flight == 1
        aengine.abort("a1")
        hold.go.set()
        outs = await asyncio.wait_for(task, 30)
        await until(lambda: aengine.stats()["num_running"] == 0, what="the row to be freed")
        return outs

    outs = loop.run_until_complete(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].token_ids == []
    assert outs[-1].num_output_tokens == 2 and len(streamed(outs)[0]) == 2  # it left at the next step
    assert store.entries["ia3"].in_flight == 0 and aengine.stats()["num_waiting"] == 0


def test_request_validation(loop, aengine):
    vocab, max_len = aengine.engine.runner.vocab_size, aengine.engine.max_len
    cases = [([], greedy(2), "prompt"), ([5, vocab], greedy(2), "prompt"), ([-1, 5], greedy(2), "prompt"),
             (list(range(5, 15)), greedy(max_len - 9), "max_tokens")]
    for prompt, params, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            aengine.add_request(prompt, params)
        assert err.value.status_code == 400 and err.value.param == param
    with pytest.raises(UnknownAdapterError) as err:
        aengine.add_request([5, 6], greedy(2), "no-such-adapter")
    assert err.value.status_code == 404
    assert aengine.stats()["num_waiting"] == 0  # nothing was queued or held by a refused request
    assert all(a["in_flight"] == 0 for a in aengine.list_adapters())

    async def fits():  # exactly max_model_len is allowed; the model name means the base model
        stream = aengine.add_request(list(range(5, 15)), greedy(max_len - 10), aengine.model_name)
        first = await stream.__anext__()
        aengine.abort(stream.request_id)
        return [first] + await collect(stream)

    outs = loop.run_until_complete(asyncio.wait_for(fits(), 60))
    assert outs[0].token_ids and outs[-1].finish_reason == "abort"


def test_queue_bound(loop, tiny_model_dir, root):
    eng = start(loop, config(tiny_model_dir, root, max_num_seqs=1, max_waiting=2))
    hold = Hold("q0", 1)
    eng.add_observer(hold)
    try:
        async def main():
            first = asyncio.ensure_future(collect(eng.add_request([5, 6], greedy(3), request_id="q0")))
            await wait_event(hold.reached)  # the step thread is busy: new requests queue up
            for _ in range(3):  # admin jobs waiting in the inbox are not waiting requests (nor count to the bound)
                eng._submit(lambda: None)
            assert eng.stats()["num_waiting"] == 0
            queued = [asyncio.ensure_future(collect(eng.add_request([7, 8], greedy(2)))) for _ in range(2)]
            assert eng.stats()["num_waiting"] == 2
            with pytest.raises(QueueFullError) as err:
                eng.add_request([7, 8], greedy(2))
            assert err.value.status_code == 429
            hold.go.set()
            done = await asyncio.wait_for(asyncio.gather(first, *queued), 30)
            assert all(outs[-1].finish_reason == "length" for outs in done)
            return await asyncio.wait_for(collect(eng.add_request([7, 8], greedy(2))), 30)  # room again

        assert loop.run_until_complete(main())[-1].finished
    finally:
        hold.go.set()
        loop.run_until_complete(eng.shutdown(5))


def test_start_freezes_the_startup_heap_and_the_last_shutdown_thaws_it(loop, tiny_model_dir, root):
    """Serving runs with the start-up heap frozen out of the collector's reach (a gen-2 collection on the
    loader thread walked it all, holding the GIL the step thread needs). The last engine to shut down gives
    it back, so what the engines held can be collected in a program that goes on; one of two stopping
    does not thaw the other's heap."""
    from server.engine import async_engine

    already = async_engine._frozen  # the module's shared engine, when an earlier test started it
    first = start(loop, config(tiny_model_dir, root, max_loras=1, max_num_seqs=1))
    try:
        assert gc.get_freeze_count() > 10_000  # torch, transformers, the model's modules
        second = start(loop, config(tiny_model_dir, root, max_loras=1, max_num_seqs=1))
        loop.run_until_complete(first.shutdown(5))
        assert gc.get_freeze_count() > 10_000, "the second engine still serves"
        loop.run_until_complete(second.shutdown(5))
    finally:
        loop.run_until_complete(first.shutdown(5))
    assert async_engine._frozen == already and (gc.get_freeze_count() == 0) == (already == 0)


def test_requests_sent_in_one_loop_turn_start_in_one_step(loop, tiny_model_dir, root):
    """A client's burst (requests added in one turn of the event loop) is prefilled in one step. The loop thread
    releases the GIL between the adds here (as a tokenizer call does): a step thread woken at the first add ran
    a step for it alone, and the others waited for that step."""
    import time

    eng = start(loop, config(tiny_model_dir, root, max_num_seqs=8))
    steps = []
    execute = eng.engine.runner.execute
    eng.engine.runner.execute = lambda seqs, weights: (steps.append(len(seqs)), execute(seqs, weights))[1]
    try:
        async def burst():
            streams = []
            for i in range(8):
                streams.append(eng.add_request([5 + i, 6, 7], greedy(2)))
                time.sleep(0.002)  # GIL released: an awake step thread would run now
            return await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 30)

        done = loop.run_until_complete(burst())
        assert all(outs[-1].finish_reason == "length" for outs in done)
        assert steps[0] == 8, steps
    finally:
        loop.run_until_complete(eng.shutdown(5))


def test_a_request_id_already_in_flight_is_refused(loop, aengine):
    """Streams and sampler state are keyed by the request id: a second request under a live id would take the
    first one's tokens (and the first would never end). Refused with a 400; the id is free again once it ends."""
    from server.errors import InvalidRequestError

    async def main():
        first = aengine.add_request([5, 6, 7], greedy(4), None, request_id="dup")
        with pytest.raises(InvalidRequestError, match="already in flight"):
            aengine.add_request([5, 6, 7], greedy(4), None, request_id="dup")
        outs = await collect(first)
        assert outs[-1].finished and sum(len(o.token_ids) for o in outs) == 4
        again = await collect(aengine.add_request([5, 6, 7], greedy(4), None, request_id="dup"))
        assert again[-1].finished

    loop.run_until_complete(main())


def test_a_failed_step_still_delivers_what_it_had_made(loop, aengine, monkeypatch):
    """A step that raises after ending some requests (here: an abort it reaped) still hands those requests their
    final output: their streams end (they hung, their ids "in flight" forever), the others get the step's 500."""
    hold = Hold("held", 3)
    aengine.add_observer(hold)
    async def main():
        aborted = asyncio.ensure_future(collect(aengine.add_request([5, 6, 7], greedy(50), None, request_id="gone")))
        held = asyncio.ensure_future(collect(aengine.add_request([8, 9, 10], greedy(50), None, request_id="held")))
        await wait_event(hold.reached)  # the step thread is parked mid-step
        support.fail_next_execute(aengine.engine.runner, monkeypatch)
        aengine.abort("gone")  # reaped by the next step, which then fails
        hold.go.set()
        gone, kept = await asyncio.wait_for(asyncio.gather(aborted, held), 20)
        assert gone[-1].finished and gone[-1].finish_reason == "abort" and gone[-1].error is None
        assert kept[-1].finished and kept[-1].error_status == 500 and "injected" in kept[-1].error
        assert "gone" not in aengine._requests and "held" not in aengine._requests
        again = await asyncio.wait_for(collect(aengine.add_request([5, 6, 7], greedy(2), None, request_id="gone")), 20)
        assert again[-1].finish_reason == "length"

    try:
        loop.run_until_complete(main())
    finally:
        hold.go.set()
        aengine.observers.remove(hold)


def test_an_observer_that_raises_is_passed_over(loop, aengine):
    """Metrics, tenancy and the request log observe the step: one that raises is logged, and the requests (and
    the step thread) go on as if it had not been there."""
    class Broken:
        def on_token(self, req, now):
            raise RuntimeError("observer bug")

        def on_request_finished(self, req):
            raise RuntimeError("observer bug")

    broken = Broken()
    aengine.add_observer(broken)
    try:
        outs = loop.run_until_complete(asyncio.wait_for(collect(aengine.add_request([5, 6, 7], greedy(4))), 20))
        assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == 4 and not outs[-1].error
    finally:
        aengine.observers.remove(broken)


def test_a_closed_event_loop_stops_the_step_loop_quietly(tiny_model_dir, root):
    """A forced exit (a second Ctrl-C) closes the event loop under a running step thread: it stops, without the
    "Event loop is closed" traceback it died with."""
    own = asyncio.new_event_loop()
    eng = start(own, config(tiny_model_dir, root))
    errors = []
    previous, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_value)
    try:
        eng.add_request([5, 6, 7], greedy(100), request_id="long")  # from the loop's thread, as a route does
        own.close()  # the loop goes away while the step thread generates
        eng._thread.join(20)
        assert not eng._thread.is_alive() and not errors, errors
    finally:
        threading.excepthook = previous
        eng._stop = True
        eng.engine.store.close()
