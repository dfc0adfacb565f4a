"""The real server, over HTTP: `python -m server serve` started as a child of the benchmark, driven the way
vLLM's benchmark_serving drives a server (SSE from /v1/completions, `ignore_eos`; each chunk one token for
the inter-token gaps, the final usage for the count) and loaded with vLLM's /v1/load_lora_adapter.

It measures what a client of the server sees, HTTP, JSON, SSE and the event loop included, for the target
cell (once per grid round, right beside the in-process run of that cell, so their ratio is taken round by round)
and for the load-interference row; the grid runs in-process (bench.drivers.EngineDriver), where every anchor runs
too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import httpx

from bench.drivers import BenchRequest

log = logging.getLogger("bench")
BASE = "base"  # the served name of the base model
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(server, path: str, timeout: float) -> None:
    """Poll ``server.url + path`` until ``server.answered`` accepts the response (200 for ChildServer); on exit
    or timeout close the server and raise, naming its log (``server.proc``, ``server.log`` and ``server.close``
    as ServerProcess has them)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=server.url) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                break
            try:
                if server.answered(await client.get(path)):
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    server.close()
    raise RuntimeError(f"{server.proc.args[0]} did not become ready (exit status {server.proc.returncode}); "
                       f"its log: {server.log.name}")


class ChildServer:
    """A server this benchmark started on a loopback port (``proc``), logging to ``log``, ready when
    ``ready_path`` answers 200; close() stops it."""

    ready_path = "/ready"

    def __init__(self, cmd: list[str], log_path: Path, port: int, **popen) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, **popen)
        self.started = time.perf_counter()  # what its start cost shows in the log line of whoever waits for it

    async def wait_ready(self, timeout: float = 300.0) -> None:
        await wait_http(self, self.ready_path, timeout)

    def answered(self, response: httpx.Response) -> bool:
        return response.status_code == 200

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ServerProcess(ChildServer):
    """`python -m server serve` on a free loopback port, with an admin key, until close()."""

    def __init__(self, args: list[str], log_path: Path, threads: int) -> None:
        port, self.admin_key = free_port(), secrets.token_hex(16)
        self.loaded: set[str] = set()  # adapters loaded through any driver: one server serves several sections
        super().__init__(
            [sys.executable, "-m", "server", "serve", *args, "--served-model-name", BASE, "--host", "127.0.0.1",
             "--port", str(port), "--admin-key", self.admin_key, "--threads", str(threads),
             "--log-level", "warning"],
            log_path, port, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def answered(self, response: httpx.Response) -> bool:
        """Ready, and its KV pool resident (servers before that field: ready is enough): no measured request
        races the thread that populates the pool."""
        return response.status_code == 200 and response.json().get("kv_cache_resident", True)


class HttpDriver:
    """A bench Driver (see bench.drivers) over the server's OpenAI routes."""

    name = "swapserve over HTTP"

    def __init__(self, server) -> None:
        self.admin = {"Authorization": f"Bearer {getattr(server, 'admin_key', '')}"}
        self.loaded: set[str] = getattr(server, "loaded", set())
        self.client = httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(600.0),
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))

    def body(self, req: BenchRequest) -> dict:
        """The /v1/completions body of one request (a peer's driver renames the adapter field)."""
        return {"model": req.adapter or BASE, "prompt": req.prompt, "max_tokens": req.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def stream(self, req: BenchRequest) -> AsyncIterator[int]:
        """One token per chunk that carries text or no finish reason (a closing chunk with only a finish reason
        carries none); the final usage settles what the chunks did not show (tokens that shared a chunk)."""
        seen = 0
        async with self.client.stream("POST", "/v1/completions", json=self.body(req)) as response:
            if response.status_code != 200:
                raise RuntimeError(f"request on {req.adapter!r}: {response.status_code} {await response.aread()}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                choice = (chunk.get("choices") or [None])[0]
                if choice is not None and (choice.get("text") or choice.get("finish_reason") is None):
                    seen += 1
                    yield 1
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens", 0) > seen:
                    yield usage["completion_tokens"] - seen
                    seen = usage["completion_tokens"]

    async def itl_totals(self) -> tuple[float, float]:
        """The server's own inter-token latency histogram so far (``vllm:inter_token_latency_seconds``): (sum in
        seconds, count). The difference of two readings is what the server measured between them."""
        from prometheus_client.parser import text_string_to_metric_families

        r = await self.client.get("/metrics")
        r.raise_for_status()
        for family in text_string_to_metric_families(r.text):
            if family.name == "vllm:inter_token_latency_seconds":
                found = {s.name.rsplit("_", 1)[-1]: s.value for s in family.samples
                         if s.name.endswith(("_sum", "_count"))}
                return found["sum"], found["count"]
        raise RuntimeError("the server's /metrics has no vllm:inter_token_latency_seconds")

    async def load_adapter(self, name: str, path: str) -> None:
        """Load ``name`` unless an earlier section already did on this server (a second load is a 400)."""
        if name in self.loaded:
            return
        r = await self.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                                   headers=self.admin)
        if r.status_code != 200:
            raise RuntimeError(f"loading {name}: {r.status_code} {r.text}")
        self.loaded.add(name)

    async def close(self) -> None:
        await self.client.aclose()
