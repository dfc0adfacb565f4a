"""Metrics: Prometheus series in a per-app registry, fed as an engine observer and refreshed on scrape.

vLLM's names (dashboards, GuideLLM and the Gateway API Inference Extension read them):
  vllm:time_to_first_token_seconds   arrival -> first token          (histogram)
  vllm:inter_token_latency_seconds   between consecutive tokens      (histogram)
  vllm:e2e_request_latency_seconds   arrival -> last token           (histogram)
  vllm:request_queue_time_seconds    arrival -> first scheduled      (histogram)
  vllm:num_requests_running / vllm:num_requests_waiting / vllm:kv_cache_usage_perc   (gauges, engine.stats())
  vllm:prefix_cache_queries / vllm:prefix_cache_hits   prompt tokens looked up / found (counters)
  vllm:num_preemptions                                 requests preempted for KV blocks (counter)
  vllm:lora_requests_info{max_lora,running_lora_adapters,waiting_lora_adapters} = unix time of the update;
      as in vLLM the labels carry the state, but only the latest label set is kept (bounded cardinality).
  vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:request_success_total{finished_reason}
swapserve's own: per-adapter requests / generation tokens / errors, and the adapter cache (entries per tier,
hits, misses, load seconds).

Versions and residency (refreshed on scrape from engine.residency() and engine.stats()):
  swapserve:adapter_version_requests / swapserve:adapter_version_generation_tokens {adapter, version}
      finished requests and tokens per adapter name and content version (a canary's arms side by side)
  vllm:lora_adapter_loaded{adapter_name, level, pinned} = 1 for each loaded version where it is resident, named
      as in vLLM's proposal: level "gpu" = a device slot (whatever the device), "cpu" = host memory only;
      an adapter only on disk has no series. adapter_name is the name for a current version, name@version
      for an older one.
  swapserve:adapter_loads{tier} / swapserve:adapter_evictions{tier}  copies into / out of device slots and
      host memory (counters)
  swapserve:adapter_hit_ratio{tier}  device: lookups (one per adapter per step) that found it in a slot;
      host: request lookups that found it in host memory
"""
from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
UNKNOWN_ADAPTER = "<unknown>"  # label for refused adapter names (user input must not create label values)


class Metrics:
    """Engine observer (see server/engine/INTERFACE.md) plus the API's error counts; `render()` for /metrics."""

    def __init__(self, model_name: str, max_loras: int) -> None:
        self.model_name = model_name
        self.max_loras = max_loras
        prometheus_client.disable_created_metrics()  # no *_created series (process-wide switch, as in vLLM)
        self.registry = CollectorRegistry()
        self._last_token: dict[str, float] = {}  # request_id -> time of its latest token
        self._latency_series()
        self._engine_series()
        self._adapter_series()

    def _latency_series(self) -> None:
        reg, lbl = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token in seconds.", lbl,
                              buckets=TTFT_BUCKETS, registry=reg).labels(self.model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", lbl,
                             buckets=ITL_BUCKETS, registry=reg).labels(self.model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.", lbl,
                             buckets=REQUEST_BUCKETS, registry=reg).labels(self.model_name)
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent waiting in the queue.", lbl,
                                    buckets=REQUEST_BUCKETS, registry=reg).labels(self.model_name)

    def _engine_series(self) -> None:
        reg, lbl = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", lbl,
                             registry=reg).labels(self.model_name)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", lbl,
                             registry=reg).labels(self.model_name)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage: share of the paged cache's blocks held "
                              "by sequences (1 = full).", lbl, registry=reg).labels(self.model_name)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      lbl, registry=reg).labels(self.model_name)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", lbl,
                                   registry=reg).labels(self.model_name)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted (KV blocks ran out; recomputed "
                                   "later).", lbl, registry=reg).labels(self.model_name)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting adapters; value = update time.",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", lbl,
                                     registry=reg).labels(self.model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lbl,
                                         registry=reg).labels(self.model_name)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       lbl + ["finished_reason"], registry=reg)

    def _adapter_series(self) -> None:
        reg = self.registry
        self.adapter_requests = Counter("swapserve:adapter_requests", "Finished requests per adapter "
                                        "(the base model counts under its served name).", ["adapter"], registry=reg)
        self.adapter_tokens = Counter("swapserve:adapter_generation_tokens", "Generated tokens per adapter.",
                                      ["adapter"], registry=reg)
        self.adapter_errors = Counter("swapserve:adapter_errors", "Failed requests per adapter and error type.",
                                      ["adapter", "error_type"], registry=reg)
        self.cache_entries = Gauge("swapserve:adapter_cache_entries", "Adapters resident per tier.", ["tier"],
                                   registry=reg)
        self.cache_hits = Counter("swapserve:adapter_cache_hits", "Adapter lookups already on the device.",
                                  registry=reg)
        self.cache_misses = Counter("swapserve:adapter_cache_misses", "Adapter lookups that had to load.",
                                    registry=reg)
        self.load_seconds = Histogram("swapserve:adapter_load_seconds", "Seconds to load an adapter.",
                                      buckets=LOAD_BUCKETS, registry=reg)
        self._version_series()

    def _version_series(self) -> None:
        reg = self.registry
        self.version_requests = Counter("swapserve:adapter_version_requests", "Finished requests per adapter and "
                                        "content version.", ["adapter", "version"], registry=reg)
        self.version_tokens = Counter("swapserve:adapter_version_generation_tokens", "Generated tokens per adapter "
                                      "and content version.", ["adapter", "version"], registry=reg)
        self.loaded = Gauge("vllm:lora_adapter_loaded", "1 where an adapter version is resident: level gpu = a "
                            "device slot, cpu = host memory only.", ["adapter_name", "level", "pinned"], registry=reg)
        self.tier_loads = Counter("swapserve:adapter_loads", "Adapter copies into each tier (device: slot fills; "
                                  "host: reads from disk that added a copy).", ["tier"], registry=reg)
        self.tier_evictions = Counter("swapserve:adapter_evictions", "Adapter versions evicted from each tier.",
                                      ["tier"], registry=reg)
        self._counted: dict[str, int] = {}  # the engine's counts already added to the two counters above
        self.hit_ratio = Gauge("swapserve:adapter_hit_ratio", "Share of adapter lookups that found it in the tier "
                               "(device: per adapter per step; host: per request).", ["tier"], registry=reg)
        self._host_lookups = [0, 0]  # hits, misses

    # --- engine observer -------------------------------------------------------------------------
    def on_prefix_cache(self, queries: int, hits: int) -> None:
        self.prefix_queries.inc(queries)
        self.prefix_hits.inc(hits)

    def on_preempt(self, count: int) -> None:
        self.preemptions.inc(count)

    def on_token(self, req, now: float) -> None:
        """Counted as they come (vLLM's): generated tokens each step; TTFT and the prompt's tokens at the first
        token, so rates over a long stream move while it streams, not all at its end."""
        last = self._last_token.get(req.request_id)
        if last is not None:
            self.itl.observe(max(0.0, now - last))
        else:
            self.ttft.observe(max(0.0, now - req.arrival_time))
            self.prompt_tokens.inc(len(req.prompt_token_ids))
        self.generation_tokens.inc()
        self._last_token[req.request_id] = now

    def on_request_finished(self, req) -> None:
        if self._last_token.pop(req.request_id, None) is None and req.first_token_time is not None:
            self.prompt_tokens.inc(len(req.prompt_token_ids))  # max_tokens 0: its prompt was computed, no token
        end = req.finished_time or time.monotonic()
        self.e2e.observe(max(0.0, end - req.arrival_time))
        if req.first_scheduled_time is not None:
            self.queue_time.observe(max(0.0, req.first_scheduled_time - req.arrival_time))
        generated = len(req.output_token_ids)
        failed = req.error is not None
        self.request_success.labels(self.model_name, "error" if failed else req.finish_reason or "abort").inc()
        # a mixture counts once for each of its adapters (labels stay adapter names, name@version pins counted
        # under the name: bounded cardinality; versions have their own series). A name that never loaded and
        # failed (an invented on-demand name) is UNKNOWN_ADAPTER: client input must not create label values.
        read = [(u.entry.name if u.entry.version is not None or not failed else UNKNOWN_ADAPTER, u.entry.version)
                for u in req.uses] or [(self.model_name, None)]
        for name, version in read:
            self.adapter_requests.labels(name).inc()
            self.adapter_tokens.labels(name).inc(generated)
            if failed:
                self.adapter_errors.labels(name, "generation").inc()
            if version is not None:
                self.version_requests.labels(name, version).inc()
                self.version_tokens.labels(name, version).inc(generated)

    def on_adapter_event(self, event: str, name: str, seconds: float | None) -> None:
        if event == "hit":
            self.cache_hits.inc()
            self._host_lookups[0] += 1
        elif event == "miss":
            self.cache_misses.inc()
            self._host_lookups[1] += 1
        elif event == "load" and seconds is not None:
            self.load_seconds.observe(seconds)
        # evictions: swapserve:adapter_evictions{tier}, counted by the tiers themselves (refresh_residency)

    # --- API side --------------------------------------------------------------------------------
    def record_error(self, adapter: str | None, error_type: str) -> None:
        """A refused or failed request; pass UNKNOWN_ADAPTER for names the engine did not know."""
        self.adapter_errors.labels(adapter or self.model_name, error_type).inc()

    def refresh(self, stats: dict) -> None:
        """Copy the engine's instantaneous state (engine.stats()) into the gauges; called on each scrape."""
        self.running.set(stats.get("num_running", 0))
        self.waiting.set(stats.get("num_waiting", 0))
        self.kv_usage.set(stats.get("kv_cache_usage", 0.0))
        self.lora_info.clear()
        self.lora_info.labels(str(stats.get("max_loras", self.max_loras)),
                              ",".join(stats.get("running_adapters", [])),
                              ",".join(stats.get("waiting_adapters", []))).set(time.time())

    def snapshot(self) -> dict:
        """Totals since start for the console's stats route (server.api.stats): counters by series name
        (prompt_tokens, generation_tokens, requests) and the latency histograms as cumulative
        [(upper bound, count), ...] (ttft, itl, e2e, queue), read from the series /metrics exports."""
        hists = {self.ttft: "ttft", self.itl: "itl", self.e2e: "e2e", self.queue_time: "queue"}
        out: dict = {"prompt_tokens": _total(self.prompt_tokens), "generation_tokens": _total(self.generation_tokens),
                     "requests": _total(self.request_success)}
        for hist, key in hists.items():
            buckets = []
            for metric in hist.collect():
                buckets = [(float(s.labels["le"]), s.value) for s in metric.samples if s.name.endswith("_bucket")]
            out[key] = buckets
        return out

    def per_adapter(self) -> dict[str, dict[str, float]]:
        """{adapter: {"requests", "tokens"}} since start, read from the counters /metrics exports (the console's
        per-adapter columns)."""
        out: dict[str, dict[str, float]] = {}
        for counter, field in ((self.adapter_requests, "requests"), (self.adapter_tokens, "tokens")):
            for metric in counter.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        out.setdefault(sample.labels["adapter"], {"requests": 0, "tokens": 0})[field] += sample.value
        return out

    def refresh_residency(self, stats: dict, residency: list[dict]) -> None:
        """engine.residency() into vllm:lora_adapter_loaded (gone versions drop out) and the versions per tier
        (swapserve:adapter_cache_entries), and the tiers' load, eviction and hit counts from engine.stats()."""
        self.loaded.clear()
        for tier in ("device", "host", "disk"):
            self.cache_entries.labels(tier).set(sum(1 for item in residency if item["tier"] == tier))
        for item in residency:
            level = {"device": "gpu", "host": "cpu"}.get(item["tier"])
            if level is not None:
                self.loaded.labels(item["adapter"], level, str(bool(item["pinned"])).lower()).set(1)
        for tier in ("device", "host"):
            for series, what in ((self.tier_loads, "loads"), (self.tier_evictions, "evictions")):
                key = f"{tier}_{what}"
                now = stats.get(key, 0)
                series.labels(tier).inc(max(0, now - self._counted.get(key, 0)))
                self._counted[key] = now
        hits, fills = stats.get("device_hits", 0), stats.get("device_loads", 0)
        self.hit_ratio.labels("device").set(hits / (hits + fills) if hits + fills else 0.0)
        hits, misses = self._host_lookups
        self.hit_ratio.labels("host").set(hits / (hits + misses) if hits + misses else 0.0)

    def render(self, stats: dict, residency: list[dict] | None = None) -> bytes:
        self.refresh(stats)
        self.refresh_residency(stats, residency or [])
        return generate_latest(self.registry)


def _total(counter) -> float:
    """The sum of a counter's (or a labelled counter's every child's) ``_total`` samples."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))
