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

from bench.timing import Trace, summarize


@dataclass
class BenchRequest:
    prompt: list[int]
    adapter: str | None  # None = the base model
    max_tokens: int
    grammar: object = None  # a compiled grammar (engine.grammar.compile): a structured-output request
    adapters: list[tuple[str, float]] | None = None  # instead of ``adapter``: a mixture [(adapter, scale), ...]


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

    async def outputs(self, req: BenchRequest) -> AsyncIterator:
        """The engine's own RequestOutput increments (num_cached_tokens and all)."""
        from server.engine.request import SamplingParams

        extra = {"grammar": req.grammar} if req.grammar is not None else {}  # engine v1 (a baseline) has no grammars
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True, **extra)
        mixture = {"adapters": req.adapters} if req.adapters is not None else {}  # engine v1 has no mixtures
        async for out in self.engine.generate(req.prompt, params, req.adapter, **mixture):
            if out.error:
                raise RuntimeError(f"request on {req.adapter!r} failed: {out.error}")
            yield out

    async def stream(self, req: BenchRequest) -> AsyncIterator[int]:
        async for out in self.outputs(req):
            yield len(out.token_ids)

    async def load_adapter(self, name: str, path: str) -> None:
        await self.engine.load_adapter(name, path)


async def _one(driver: Driver, req: BenchRequest, at: float | None = None) -> Trace:
    """``at``: a perf_counter time to send at; the Trace counts from it (open loop: a late send is the
    server's delay, as it is for a real client), else from now."""
    if at is not None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
    trace = Trace(time.perf_counter() if at is None else at)
    async for n in driver.stream(req):
        trace.add(time.perf_counter(), n)
    return trace


async def run_concurrent(driver: Driver, reqs: list[BenchRequest]) -> list[Trace]:
    """All requests are sent at once; returns one Trace per request, in order."""
    return list(await asyncio.gather(*(_one(driver, r) for r in reqs)))


async def run_streams(driver: Driver, reqs: list[BenchRequest], streams: int) -> list[Trace]:
    """Closed loop: ``streams`` clients each send their next request when their last one finished (what
    GuideLLM's `concurrent` profile does), until ``reqs`` are all done; one Trace per request, in order."""
    queue = list(enumerate(reqs))[::-1]
    traces: list[Trace | None] = [None] * len(reqs)

    async def client() -> None:
        while queue:
            i, req = queue.pop()
            traces[i] = await _one(driver, req)

    await asyncio.gather(*(client() for _ in range(min(streams, len(reqs)))))
    return traces


async def alternating_rounds(driver: Driver, a: list[BenchRequest], b: list[BenchRequest],
                             rounds: int, prompts) -> tuple[list[float], list[float]]:
    """Tokens/s of cell ``a`` then cell ``b``, ``rounds`` times in turn on one engine (drifting load on a shared
    machine hits both alike); one list per cell. Every run gets fresh prompts (``prompts``: a PromptSource), so
    no round is served from an earlier one's prefix cache."""
    a_tok, b_tok = [], []
    for _ in range(rounds):
        a_tok.append(summarize(await run_concurrent(driver, prompts.renew(a)))["tok_s"])
        b_tok.append(summarize(await run_concurrent(driver, prompts.renew(b)))["tok_s"])
    return a_tok, b_tok


async def run_arrivals(driver: Driver, reqs: list[BenchRequest], offsets: list[float]) -> list[Trace]:
    """Request i is sent ``offsets[i]`` seconds after the call, whatever happened to the others (open loop);
    one Trace per request, in order, each timed from its scheduled send."""
    start = time.perf_counter()
    return list(await asyncio.gather(*(_one(driver, r, start + o) for r, o in zip(reqs, offsets))))


async def load_and_warm(driver: Driver, adapters: dict[str, str], prompts) -> None:
    """Host-load every adapter, then one short request per adapter (fresh prompts from ``prompts``, a
    PromptSource), all at once: the device slots are filled and no measured request pays a first load."""
    for name, path in adapters.items():
        await driver.load_adapter(name, str(path))
    names = list(adapters)
    await run_concurrent(driver, cell_requests(prompts.take(len(names)), names, 4))


def cell_requests(prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> list[BenchRequest]:
    """Request i uses adapters[i % len(adapters)] (round-robin: every adapter gets N/k rows)."""
    return [BenchRequest(p, adapters[i % len(adapters)], max_tokens) for i, p in enumerate(prompts)]
