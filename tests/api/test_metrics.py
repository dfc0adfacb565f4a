"""/metrics exposes vLLM's series plus per-adapter and adapter-cache series; /health and /ready."""
from __future__ import annotations

import time

from .helpers import metric_value, samples, wait_for

REQUIRED = ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
            "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
            "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "vllm:lora_requests_info",
            "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "swapserve:adapter_requests_total", "swapserve:adapter_generation_tokens_total",
            "swapserve:adapter_cache_hits_total", "swapserve:adapter_cache_misses_total",
            "swapserve:adapter_load_seconds_count")


def test_probes(server):
    """/ready also says when the KV pool is resident (populated on a background thread after start on CPU):
    ready comes first, resident follows without any request."""
    import time

    with server.client() as http:
        assert http.get("/health").status_code == 200
        body = http.get("/ready").json()
        assert body["status"] == "ready" and isinstance(body["kv_cache_resident"], bool)
        deadline = time.monotonic() + 60
        while not body["kv_cache_resident"] and time.monotonic() < deadline:
            time.sleep(0.1)
            body = http.get("/ready").json()
        assert body == {"status": "ready", "kv_cache_resident": True}


def test_series_are_exposed_and_count_requests(server):
    with server.client() as http:
        before = metric_value(http, "swapserve:adapter_requests_total", adapter="preloaded")
        tokens_before = metric_value(http, "vllm:generation_tokens_total")
        r = http.post("/v1/completions", json={"model": "preloaded", "prompt": "hello", "max_tokens": 4})
        assert r.status_code == 200
        assert wait_for(lambda: metric_value(http, "swapserve:adapter_requests_total", adapter="preloaded")
                        == before + 1)
        names = {s.name for s in samples(http)}
        assert set(REQUIRED) <= names, set(REQUIRED) - names
        assert metric_value(http, "vllm:generation_tokens_total") >= tokens_before + 4
        assert metric_value(http, "vllm:e2e_request_latency_seconds_count", model_name="tiny-llama") >= 1


def test_refused_adapter_counts_as_error_without_its_name(server):
    with server.client() as http:
        before = metric_value(http, "swapserve:adapter_errors_total", adapter="<unknown>")
        assert http.post("/v1/completions", json={"model": "made-up-name", "prompt": "hi"}).status_code == 404
        assert metric_value(http, "swapserve:adapter_errors_total", adapter="<unknown>") == before + 1
        assert not any(s.labels.get("adapter") == "made-up-name" for s in samples(http))


def test_running_gauges_and_lora_info_during_a_stream(server):
    body = {"model": "preloaded", "prompt": "hello", "max_tokens": 480, "ignore_eos": True, "stream": True}
    with server.client() as http, server.client() as streamer, streamer.stream("POST", "/v1/completions",
                                                                                json=body) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the stream (a disconnect)
        next(line for line in lines if line.startswith("data:"))
        assert metric_value(http, "vllm:num_requests_running") == 1
        info = [s for s in samples(http) if s.name == "vllm:lora_requests_info"]
        assert len(info) == 1 and info[0].labels["running_lora_adapters"] == "preloaded"
        assert info[0].labels["max_lora"] == "2" and abs(info[0].value - time.time()) < 60
    with server.client() as http:
        assert wait_for(lambda: metric_value(http, "vllm:num_requests_running") == 0, timeout=5)
