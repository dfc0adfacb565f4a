"""The bench measures every run on fresh prompts: a prompt sent twice is served from the prefix cache the second
time, and a system (or a cell) that happened to repeat more prompts than another was measured on less work.
Before PromptSource, the grid's 32 prompts were 17 rotations of one passage reused in every cell and round, and
the "no adapter" runs read half of every prompt from the cache."""
from __future__ import annotations

import asyncio

from bench.drivers import BenchRequest, EngineDriver, run_concurrent
from bench.request_set import PromptSource


def test_every_take_is_fresh_and_reproducible():
    one, two = PromptSource(500, 32, 0), PromptSource(500, 32, 0)
    a, b = one.take(40), one.take(40)
    assert all(len(p) == 32 for p in a + b)
    assert len({tuple(p) for p in a + b}) == 80  # distinct within a take and across takes
    assert two.take(40) == a and two.take(40) == b  # the same sequence of draws for a seed
    reqs = [BenchRequest([1] * 5, "x", 3), BenchRequest([2] * 9, None, 4)]
    renewed = one.renew(reqs)
    assert [len(r.prompt) for r in renewed] == [5, 9] and [r.prompt for r in renewed] != [r.prompt for r in reqs]
    assert [(r.adapter, r.max_tokens) for r in renewed] == [("x", 3), (None, 4)]


class PrefixCounter:
    def __init__(self):
        self.queries = self.hits = 0

    def on_prefix_cache(self, queries: int, hits: int) -> None:
        self.queries += queries
        self.hits += hits


def test_grid_rounds_are_never_served_from_the_prefix_cache(tiny_model_dir, adapters, tmp_path):
    """Two rounds of one cell (adapters, then the same prompts on the base model), as the grid runs them:
    no token comes from the cache. The control (the same requests twice) shows the counter sees hits."""
    from bench.config import BenchConfig
    from bench.suite import Fixtures, measure_cell
    from server.config import EngineConfig
    from server.engine.async_engine import AsyncEngine

    cell = {"a00": adapters["lora"], "a01": adapters["lora2"]}
    engine = AsyncEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu", max_loras=2,
                                      max_lora_rank=8, max_num_seqs=4, max_model_len=64, block_size=16,
                                      adapter_roots=[str(adapters["lora"].parent.parent)]))
    counter = PrefixCounter()
    engine.add_observer(counter)
    cfg = BenchConfig(prompt_tokens=33, max_tokens=3)
    fx = Fixtures(tiny_model_dir, cell, {}, [], PromptSource(len(engine.tokenizer), 33, 0), {}, {}, [], None)

    async def run():
        await engine.start()
        try:
            driver = EngineDriver(engine)
            for name, path in cell.items():
                await driver.load_adapter(name, str(path))
            for r in range(2):
                row = await measure_cell(cfg, fx, None, driver, 4, 2, True, False)
                assert row["swapserve"]["tokens"] == row["swapserve_no_adapter"]["tokens"] == 12
            measured = (counter.queries, counter.hits)
            control = [BenchRequest(p, "a00", 2) for p in fx.prompts.take(2)]
            await run_concurrent(driver, control)
            await run_concurrent(driver, control)
            return measured
        finally:
            await engine.shutdown(5)

    queries, hits = asyncio.run(run())
    assert queries == 4 * 4 * 33 and hits == 0
    assert counter.hits == 2 * 32  # the control's second run: two full blocks of each of its two prompts
