"""How the harness talks to swapserve. A Driver streams one request and yields the number of new tokens of
each increment; run_concurrent() sends many at once and records a Trace per request.

EngineDriver drives the in-process AsyncEngine; bench/http.py's HttpDriver drives the real server (SSE from
/v1/completions with ``ignore_eos``) through the same ``stream`` and ``load_adapter``.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from bench.timing import Trace


@dataclass
class BenchRequest:
    prompt: list[int]
    adapter: str | None  # None = the base model
    max_tokens: int
    grammar: object = None  # a compiled grammar (engine.grammar.compile): a structured-output request


class Driver(Protocol):
    name: str

    def stream(self, req: BenchRequest) -> AsyncIterator[int]:
        """Yield the token count of every increment until the request finishes."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Make ``name`` known (and host-resident) before it is first requested."""


class EngineDriver:
    """swapserve's AsyncEngine in this process: greedy, ``ignore_eos``, fixed ``max_tokens``."""

    name = "swapserve"

    def __init__(self, engine):
        self.engine = engine

    async def stream(self, req: BenchRequest) -> AsyncIterator[int]:
        from server.engine.request import SamplingParams

        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True, grammar=req.grammar)
        async for out in self.engine.generate(req.prompt, params, req.adapter):
            if out.error:
                raise RuntimeError(f"request on {req.adapter!r} failed: {out.error}")
            yield len(out.token_ids)

    async def load_adapter(self, name: str, path: str) -> None:
        await self.engine.load_adapter(name, path)


async def _one(driver: Driver, req: BenchRequest) -> Trace:
    trace = Trace(time.perf_counter())
    async for n in driver.stream(req):
        trace.add(time.perf_counter(), n)
    return trace


async def run_concurrent(driver: Driver, reqs: list[BenchRequest]) -> list[Trace]:
    """All requests are sent at once; returns one Trace per request, in order."""
    return list(await asyncio.gather(*(_one(driver, r) for r in reqs)))


def cell_requests(prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> list[BenchRequest]:
    """Request i uses adapters[i % len(adapters)] (round-robin: every adapter gets N/k rows)."""
    return [BenchRequest(p, adapters[i % len(adapters)], max_tokens) for i, p in enumerate(prompts)]
