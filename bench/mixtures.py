"""The mixtures cell: 32 requests each mixing 2 of 16 adapters (request i: adapter i at 0.7 and adapter i + 1 at
0.3, mod 16), against 32 single-adapter requests over the same 16, in alternating rounds on one engine. Target:
the mixed cell keeps >= 0.8x the single cell's throughput. Both touch the same 16 device slots; a mixed row reads
two of them, so its LoRA work doubles while the base GEMM is shared.
"""
from __future__ import annotations

import logging
import statistics

from bench.drivers import EngineDriver, alternating_rounds, cell_requests, run_concurrent

log = logging.getLogger("bench")
CELL = (32, 16)
SCALES = (0.7, 0.3)


async def run_mixtures(cfg, engine, adapters: dict, prompts, rounds: int = 3) -> dict:
    n, k = CELL[0], min(CELL[1], len(adapters))
    names = list(adapters)[:k]
    single = cell_requests(prompts.take(n), names, cfg.max_tokens)
    mixed = cell_requests(prompts.take(n), names, cfg.max_tokens)
    for i, req in enumerate(mixed):
        req.adapter, req.adapters = None, [(names[i % k], SCALES[0]), (names[(i + 1) % k], SCALES[1])]
    driver = EngineDriver(engine)
    await run_concurrent(driver, mixed)  # untimed: every pair's first step
    single_tok, mixed_tok = await alternating_rounds(driver, single, mixed, rounds, prompts)
    out = {"concurrency": n, "adapters": k, "single_tok_s": single_tok, "mixed_tok_s": mixed_tok,
           "ratio": statistics.median(mixed_tok) / statistics.median(single_tok)}
    log.info("mixtures: N=%d over k=%d, 2 each: single %s, mixed %s tok/s (%.2fx)", n, k,
             [round(t, 1) for t in single_tok], [round(t, 1) for t in mixed_tok], out["ratio"])
    return out


def mixtures_section(results: dict) -> list[str]:
    s = results.get("mixtures")
    if not s:
        return []
    med = statistics.median
    return ["## Adapter mixtures in a cell", "",
            f"N = {s['concurrency']} requests, each mixing 2 of k = {s['adapters']} adapters (scales "
            f"{SCALES[0]} and {SCALES[1]}: `adapters`), against the same requests on one adapter each; alternating "
            "rounds on one engine, medians.", "",
            "| cell | single tok/s | mixed tok/s | **mixed / single** (target >= 0.8x) |", "|---|---:|---:|---:|",
            f"| {s['concurrency']} x {s['adapters']} | {med(s['single_tok_s']):.1f} | {med(s['mixed_tok_s']):.1f} | "
            f"**{s['ratio']:.2f}x** |", ""]
