"""Adapter swap costs inside swapserve, and how much adapter loading disturbs running streams.

    cold load      disk (local safetensors) -> host AdapterWeights: AdapterStore's load, as the engine does it
    activate       host -> device slot: AdapterManager.activate of an adapter not in a slot (all slots full,
                   so it includes evicting the LRU slot), timed on the step thread that owns the slots
    first request  TTFT of a request naming an adapter that is only on disk (on-demand resolve + load +
                   activate + prefill), vs the TTFT of the next request on the same adapter
    interference   ITL p99 of N streams while adapters cold-load, vs the same streams without loads
                   (median over a few rounds)

The files were written moments before, so "disk" means the OS page cache; a truly cold disk adds its read time.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import time
from pathlib import Path

from bench.drivers import BenchRequest, Driver, run_concurrent
from bench.timing import percentile_ms, steady_itl, summarize


async def on_step_thread(engine, fn):
    """Run ``fn`` on the engine's step thread (the only thread allowed to touch slots) and await its result."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def job():
        try:
            fut.set_result(fn())
        except Exception as e:  # surfaced to the awaiting coroutine
            fut.set_exception(e)

    engine._submit(job)
    return await asyncio.wrap_future(fut)


async def cold_loads(engine, adapters: dict[str, Path], prefix: str = "cold-") -> list:
    """Register each adapter under a fresh name and load it into the host tier; returns the entries."""
    store = engine.engine.store
    entries = []
    for name, path in adapters.items():
        entry = store.register(prefix + name, str(path))
        await asyncio.wrap_future(store.ensure_host(entry))
        entries.append(entry)
    return entries


async def activate_seconds(engine, entries) -> list[float]:
    store, manager = engine.engine.store, engine.engine.runner.manager

    def activate(key):
        if manager.resident(key):  # the same content served under another name holds a slot: time a fill anyway
            manager.evict(key)
        start = time.perf_counter()
        manager.activate([[(key, 1.0)]], [1], store.weights)
        seconds = time.perf_counter() - start
        manager.clear()
        return seconds

    return [await on_step_thread(engine, lambda k=e.key: activate(k)) for e in entries]


async def first_request(driver: Driver, names: list[str], prompts) -> dict:
    """TTFT of the first request on an on-disk-only adapter, and of the second one on it (now resident); each
    on a fresh prompt (``prompts``: a PromptSource), so the second is not served from the first's KV."""
    first, second = [], []
    for name in names:
        for bucket in (first, second):
            trace = (await run_concurrent(driver, [BenchRequest(prompts.take(1)[0], name, 2)]))[0]
            bucket.append(trace.ttft)
    return {"first_ttft_p50_ms": percentile_ms(first), "warm_ttft_p50_ms": percentile_ms(second),
            "samples": len(names)}


async def interference(driver: Driver, reqs: list[BenchRequest], loads: dict[str, Path], prompts,
                       rounds: int = 3) -> dict:
    """The same streams, alone then with every adapter in ``loads`` cold-loading meanwhile, ``rounds`` times
    (fresh adapter names each round, so every load is cold). The figures are medians over the rounds: one
    run's p99 is its ~5 worst token gaps, and on a shared machine one stray stall in either run decided it
    (measured here: a quiet p99 of 546 ms against a 60 ms median, and rises from +5% to +64% between runs).
    ITL counts the gaps once every stream is decoding (timing.steady_itl), which is when the loads start: over
    HTTP the burst's first request or two are prefilled alone and their second token waits for the others'
    prefill (a 1.5-2 s gap; it set the quiet p99 at ~2x its p50 and read as rises of -28% to -43%)."""
    rows = []
    for r in range(rounds):
        traces = await run_concurrent(driver, prompts.renew(reqs))  # fresh prompts: no prefix hits
        quiet, decoding_at = steady_itl(traces), summarize(traces)["ttft_p50_ms"] / 1e3

        async def load_all():
            await asyncio.sleep(decoding_at)  # start once the streams are decoding
            start = time.perf_counter()
            await asyncio.gather(*(driver.load_adapter(f"intf{r}-{n}", str(p)) for n, p in loads.items()))
            return time.perf_counter() - start

        traces, load_s = await asyncio.gather(run_concurrent(driver, prompts.renew(reqs)), load_all())
        busy = steady_itl(traces)
        rows.append({"loads_seconds": load_s, "quiet_itl_p99_ms": quiet["itl_p99_ms"],
                     "loading_itl_p99_ms": busy["itl_p99_ms"], "quiet_itl_p50_ms": quiet["itl_p50_ms"],
                     "loading_itl_p50_ms": busy["itl_p50_ms"]})
    out = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    return {"streams": len(reqs), "loads": len(loads), "rounds": rounds, "steady": True, **out,
            "itl_p99_rise": out["loading_itl_p99_ms"] / out["quiet_itl_p99_ms"] - 1, "per_round": rows}


async def swap_costs(engine, driver: Driver, pool: dict[str, Path], on_demand: list[str],
                     prompts) -> dict:
    entries = await cold_loads(engine, pool)
    load_s = [e.load_seconds for e in entries]
    act_s = await activate_seconds(engine, entries)
    return {"adapter_mb": entries[0].info["size_bytes"] / 1e6, "samples": len(entries),
            "cold_load_p50_ms": percentile_ms(load_s), "cold_load_max_ms": max(load_s) * 1e3,
            "activate_p50_ms": percentile_ms(act_s), "activate_max_ms": max(act_s) * 1e3,
            **await first_request(driver, on_demand, prompts)}
