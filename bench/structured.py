"""The structured-output cell: the 32 x 16-adapter cell with a share of its requests under a JSON-schema grammar
(compiled by the engine's GrammarCompiler, masked by TokenMask), against the same cell with every request
free, in alternating rounds on one engine. Target: the mixed cell costs <= 10% throughput.

The grammar asks for an array of at least 64 strings, so no constrained request can finish before its
max_tokens: both cells compute the same tokens, and the difference is the masks (building, applying) alone.
"""
from __future__ import annotations

import asyncio
import logging
import statistics

from bench.drivers import EngineDriver, alternating_rounds, cell_requests, run_concurrent

log = logging.getLogger("bench")
CELL = (32, 16)
SCHEMA = {"type": "object", "properties": {"answers": {"type": "array", "minItems": 64,
                                                       "items": {"type": "string", "maxLength": 24}}},
          "required": ["answers"]}


async def run_structured(cfg, engine, adapters: dict, prompts, rounds: int = 3) -> dict:
    from server.engine.grammar import GrammarSpec

    n, k = CELL[0], min(CELL[1], len(adapters))
    grammar = await asyncio.to_thread(engine.grammar.compile, GrammarSpec.json_schema(SCHEMA, "bench"))
    free = cell_requests(prompts.take(n), list(adapters)[:k], cfg.max_tokens)
    every = max(1, round(1 / cfg.structured_share))
    mixed = cell_requests(prompts.take(n), list(adapters)[:k], cfg.max_tokens)
    for req in mixed[::every]:
        req.grammar = grammar
    driver = EngineDriver(engine)
    await run_concurrent(driver, mixed)  # untimed: the first constrained steps build xgrammar's state
    free_tok, mixed_tok = await alternating_rounds(driver, free, mixed, rounds, prompts)
    out = {"concurrency": n, "adapters": k, "constrained": len(mixed[::every]), "free_tok_s": free_tok,
           "mixed_tok_s": mixed_tok, "cost": 1 - statistics.median(mixed_tok) / statistics.median(free_tok),
           "overlap": engine.config.overlap_token_masks}
    log.info("structured: N=%d k=%d, %d constrained: free %s, mixed %s tok/s (cost %+.1f%%)", n, k,
             out["constrained"], [round(t, 1) for t in free_tok], [round(t, 1) for t in mixed_tok], out["cost"] * 100)
    return out


def structured_section(results: dict) -> list[str]:
    s = results.get("structured")
    if not s:
        return []
    med = statistics.median
    return ["## Structured outputs mixed into a cell", "",
            f"N = {s['concurrency']} requests on k = {s['adapters']} adapters, {s['constrained']} of them under a "
            "JSON-schema grammar (xgrammar; token masks built on a worker thread during the forward: "
            f"{'on' if s.get('overlap') else 'off'}), against the same cell all free; alternating rounds, medians.",
            "", "| cell | free tok/s | mixed tok/s | **cost** (target <= 10%) |", "|---|---:|---:|---:|",
            f"| {s['concurrency']} x {s['adapters']} | {med(s['free_tok_s']):.1f} | {med(s['mixed_tok_s']):.1f} | "
            f"**{s['cost'] * 100:+.1f}%** |", ""]
