"""Start-up: the port opens before the model is loaded (health 200, ready 503, API routes 503 "model is loading"),
the engine is built on a thread and started, then /ready turns 200; a failed load stops the server."""
from __future__ import annotations

import asyncio
import threading

import httpx
import uvicorn

from server.api.app import create_app
from server.api.serve import PendingEngine, log_startup
from server.api.settings import ServerConfig

from .conftest import engine_config, free_port
from .helpers import metric_value, wait_for


class Gated:
    """A build function that waits for `release` before building the real AsyncEngine (or failing)."""

    def __init__(self, error: Exception | None = None):
        self.release = threading.Event()
        self.error = error
        self.loaded: list = []
        self.failed: list = []

    def __call__(self, config):
        from server.engine.async_engine import AsyncEngine

        assert self.release.wait(60)
        if self.error is not None:
            raise self.error
        return AsyncEngine(config)


def _serve(pending: PendingEngine):
    port = free_port()
    app = create_app(pending, ServerConfig(port=port, shutdown_timeout=2))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 30), "server did not start"
    return server, thread, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)


def test_port_opens_while_loading_then_ready(tiny_model_dir):
    gate = Gated()
    pending = PendingEngine(engine_config(tiny_model_dir), build=gate, on_loaded=gate.loaded.append)
    server, thread, http = _serve(pending)
    try:
        assert http.get("/health").status_code == 200
        r = http.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "loading"})
        chat = http.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [
            {"role": "user", "content": "hi"}]})
        assert chat.status_code == 503 and "model is loading" in chat.json()["error"]["message"]
        assert chat.json()["error"]["code"] == 503 and chat.headers["retry-after"]
        tgi = http.post("/generate", json={"inputs": "hi"})
        assert tgi.status_code == 503 and "model is loading" in tgi.json()["error"]
        assert http.get("/v1/models").status_code == 503
        assert http.get("/v1/adapters").status_code == 503
        assert http.get("/").status_code == 200 and http.get("/v1/stats").status_code == 503  # the console waits
        assert metric_value(http, "vllm:num_requests_running") == 0  # /metrics answers while loading

        gate.release.set()
        assert wait_for(lambda: http.get("/ready").status_code == 200, 60), "engine did not become ready"
        assert len(gate.loaded) == 1 and pending.inner is gate.loaded[0]
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 3, "temperature": 0}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny-llama"]
        assert http.get("/v1/stats").json()["totals"]["generation_tokens"] == 3
        assert metric_value(http, "vllm:e2e_request_latency_seconds_count") == 1  # observer handed over
    finally:
        gate.release.set()
        server.should_exit = True
        thread.join(30)
    assert pending.inner.draining and not pending.ready


def test_failed_load_reports_and_stops(tiny_model_dir):
    gate = Gated(error=FileNotFoundError("no such model"))
    stopped = []
    pending = PendingEngine(engine_config(tiny_model_dir), build=gate, on_failed=stopped.append)
    server, thread, http = _serve(pending)
    try:
        gate.release.set()
        assert wait_for(lambda: stopped, 10)
        assert isinstance(stopped[0], FileNotFoundError) and not pending.loading
        r = http.get("/ready")
        assert (r.status_code, r.json()) == (503, {"status": "failed"})
    finally:
        server.should_exit = True
        thread.join(30)


def test_startup_log_names_model_memory_adapters_and_admin_access(tiny_model_dir, caplog):
    from server.engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(tiny_model_dir, max_loras=3, max_lora_rank=8, adapter_roots=["/srv/ad"]))
    runner = engine.engine.runner
    try:
        with caplog.at_level("INFO", logger="swapserve"):
            log_startup(engine, ServerConfig(), 1.5)
    finally:
        asyncio.run(engine.shutdown(0))
    text = caplog.text
    assert str(tiny_model_dir) in text and "loaded in 1.5s" in text
    assert "device=cpu dtype=float32 quantization=none" in text
    assert f"KV cache {runner.kv.nbytes / 2**20:.1f} MiB ({runner.kv.num_blocks - 1} blocks of 16 tokens" in text
    assert f"adapter slots {runner.slot_bytes / 2**20:.1f} MiB" in text and "parameters " in text
    assert "max_loras=3 max_lora_rank=8" in text and "/srv/ad" in text
    assert "admin routes: loopback clients only" in text
    warning = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("admin routes"))
    assert "requests through a proxy" in warning and "set --admin-key or SWAPSERVE_ADMIN_KEY" in warning
    assert next(r for r in caplog.records if r.getMessage().startswith("admin routes")).levelname == "WARNING"
