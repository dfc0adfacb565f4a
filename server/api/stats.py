"""GET /v1/stats: the server's state and recent rates and latency percentiles as JSON, for the console's
Server page (and anyone who wants numbers without a Prometheus).

Rates and percentiles are over the last WINDOW_S seconds, from the same counters and histograms /metrics
exports (Metrics.snapshot): each call keeps a snapshot, and the answer compares the newest with the oldest one
inside the window, as Prometheus' rate() and histogram_quantile() would over a range (so the two agree, bucket
interpolation included). The first call has no earlier snapshot: its window is empty and the rates are null.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque

WINDOW_S = 30.0
QUANTILES = (0.5, 0.9, 0.99)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative [(upper bound, count)] buckets ending with +Inf: linear
    within the bucket holding the q-th observation; the highest finite bound when it falls in +Inf; None when
    there are no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = upper, count
    return lower


class StatsWindow:
    """Snapshots of Metrics.snapshot() over the last ``window_s`` seconds (bounded: older ones are dropped,
    keeping the newest one older than the window as its start)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._snapshots: deque[tuple[float, dict]] = deque()
        self._lock = threading.Lock()

    def observe(self, now: float, snapshot: dict) -> dict:
        """Record ``snapshot`` taken at ``now`` (monotonic seconds); the window's rates and percentiles."""
        with self._lock:
            self._snapshots.append((now, snapshot))
            while len(self._snapshots) > 2 and self._snapshots[1][0] <= now - self.window_s:
                self._snapshots.popleft()
            start_t, start = self._snapshots[0]
        seconds = now - start_t
        out: dict = {"seconds": round(seconds, 3)}
        for key in ("generation_tokens", "prompt_tokens", "requests"):
            out[f"{key}_per_s"] = (snapshot[key] - start[key]) / seconds if seconds > 0 else None
        for key in ("ttft", "itl", "e2e", "queue"):
            delta = [(le, n - n0) for (le, n), (_, n0) in zip(snapshot[key], start[key])] if seconds > 0 else []
            out[key] = {f"p{round(q * 100)}": histogram_quantile(q, delta) for q in QUANTILES}
        return out


def server_stats(engine, metrics, window: StatsWindow) -> dict:
    """The body of GET /v1/stats."""
    stats = engine.stats()
    totals = metrics.snapshot()
    tiers = {"device": 0, "host": 0, "disk": 0}  # registered adapters per tier: counted here, not in every
    for adapter in engine.list_adapters():        # engine.stats() (the bench polls that every 50 ms)
        tiers[adapter["tier"]] += 1
    # device slots hold versions, an older one of a reloaded name too (as /metrics' residency counts them)
    slots = sum(1 for v in engine.residency() if v["tier"] == "device") if hasattr(engine, "residency") else \
        tiers["device"]
    return {
        "time": time.time(), "model": engine.model_name, "engine": engine.describe(),
        "num_running": stats.get("num_running", 0), "num_waiting": stats.get("num_waiting", 0),
        "kv_cache_usage": stats.get("kv_cache_usage"), "kv_blocks_total": stats.get("kv_blocks_total"),
        "kv_blocks_free": stats.get("kv_blocks_free"),
        "slots_used": slots, "max_loras": stats.get("max_loras"), "adapter_tiers": tiers,
        "running_adapters": stats.get("running_adapters", []), "waiting_adapters": stats.get("waiting_adapters", []),
        "totals": {k: totals[k] for k in ("prompt_tokens", "generation_tokens", "requests")},
        "window": window.observe(time.monotonic(), totals),
    }
