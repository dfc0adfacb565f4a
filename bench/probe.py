"""EngineProbe: what the engine did during one measured run, beside the client's Traces: prefix-cache
lookups and hits and preemptions (engine v2's observer hooks; None on an engine without them), and the
high-water marks of KV bytes in use and held, running and waiting requests (engine.stats(), polled)."""
from __future__ import annotations

import asyncio
import contextlib

from bench import server_api


class EngineProbe:
    """Added once as an observer of ``engine``; ``watch()`` measures one run."""

    def __init__(self, engine, period_s: float = 0.05):
        self.engine, self.period_s = engine, period_s
        self.counts = {"prefix_queries": 0, "prefix_hits": 0, "preemptions": 0}
        self.hooks = server_api.paged(engine)
        engine.add_observer(self)

    def on_prefix_cache(self, queries: int, hits: int) -> None:  # called on the engine's step thread
        self.counts["prefix_queries"] += queries
        self.counts["prefix_hits"] += hits

    def on_preempt(self, count: int) -> None:
        self.counts["preemptions"] += count

    def _sample(self, peak: dict) -> None:
        used, held = server_api.kv_bytes(self.engine)
        stats = self.engine.stats()
        for key, value in (("peak_kv_used_bytes", used), ("peak_kv_held_bytes", held),
                           ("peak_running", stats["num_running"]), ("peak_waiting", stats["num_waiting"])):
            peak[key] = max(peak.get(key, 0), value)

    async def _poll(self, peak: dict) -> None:
        while True:
            self._sample(peak)
            await asyncio.sleep(self.period_s)

    @contextlib.asynccontextmanager
    async def watch(self):
        """Yields a dict that, once the block exits, holds the run's counters (None without the hooks) and
        high-water marks: peak_kv_used_bytes, peak_kv_held_bytes, peak_running, peak_waiting."""
        before = dict(self.counts)
        out: dict = {}
        task = asyncio.create_task(self._poll(out))
        try:
            yield out
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._sample(out)
            out.update({k: (v - before[k]) if self.hooks else None for k, v in self.counts.items()})
