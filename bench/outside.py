"""GuideLLM (PyPI `guidellm`, vLLM's project) as an outside client of the real server: the same workload
measured by it and by this harness's own client, to show that our client measures what others measure.

Workload: GuideLLM's `concurrent` profile (S streams, each sending its next request when the last finished),
R requests of synthetic text with P prompt tokens and M output tokens (it asks for ``ignore_eos``), against
/v1/completions of one swapserve server, on the base model and on one adapter. Our client runs the same closed
loop (bench.drivers.run_streams) with token-id prompts of P tokens and M output tokens. Per model, our client's
rounds, then GuideLLM's as the benchmarks of one `guidellm run` (its profile takes a list of stream counts):
one process, not one per round, saves GuideLLM's ~6 s start (imports, tokenizer) on every round but the first.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from bench.drivers import cell_requests, load_and_warm, run_streams
from bench.timing import cpu_seconds, median_range, summarize

log = logging.getLogger("bench")
# One worker process, its streams on its event loop (as our client's are): GuideLLM's default spawns one process
# per stream (up to 10), each importing GuideLLM afresh, ~20 s of every run's start on 2 busy CPUs.
GUIDELLM_ENV = {"GUIDELLM__MAX_WORKER_PROCESSES": "1"}


def guidellm_command(url: str, model: str, tokenizer: Path, streams: int, requests: int, prompt: int,
                     output: int, out: Path, rounds: int = 1) -> list[str]:
    """One `guidellm run` of ``rounds`` benchmarks, each ``requests`` requests over ``streams`` streams."""
    exe = shutil.which("guidellm", path=str(Path(sys.executable).parent)) or "guidellm"
    return [exe, "run",
            "--backend", f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
            "--profile", json.dumps({"kind": "concurrent", "streams": [streams] * rounds}),
            "--constraint", f"kind=max_requests,count={requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={prompt},output_tokens={output}",
            "--tokenizer", f"kind=hf_auto,model={tokenizer}",
            "--output", f"kind=json,path={out}", "--disable-console"]


def guidellm_numbers(report: dict, i: int = 0) -> dict:
    """Output tok/s, TTFT and ITL (p50, p99; ms) and the request count of benchmark ``i`` of GuideLLM's JSON
    report."""
    m = report["benchmarks"][i]["metrics"]

    def pct(name: str, q: str) -> float | None:
        return m[name]["successful"]["percentiles"].get(q)

    return {"tok_s": m["output_tokens_per_second"]["successful"]["mean"],
            "requests": m["request_totals"]["successful"],
            "output_tokens_mean": m["output_token_count"]["successful"]["mean"],
            "ttft_p50_ms": pct("time_to_first_token_ms", "p50"), "ttft_p99_ms": pct("time_to_first_token_ms", "p99"),
            "itl_p50_ms": pct("inter_token_latency_ms", "p50"), "itl_p99_ms": pct("inter_token_latency_ms", "p99")}


async def run_guidellm(url: str, model: str, tokenizer: Path, streams: int, requests: int, prompt: int,
                       output: int, rounds: int = 1) -> list[dict]:
    """guidellm_numbers of each of the run's ``rounds`` benchmarks."""
    with tempfile.TemporaryDirectory(prefix="swapserve-bench-guidellm-") as tmp:
        out = Path(tmp) / "report.json"
        cmd = guidellm_command(url, model, tokenizer, streams, requests, prompt, output, out, rounds)
        start, cpu = time.perf_counter(), cpu_seconds()
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                    env={**os.environ, **GUIDELLM_ENV})
        text, _ = await proc.communicate()
        log.info("guidellm run of %d benchmarks on %s: %.0fs (CPU %.0fs: GuideLLM and this process)", rounds, model,
                 time.perf_counter() - start, cpu_seconds() - cpu)
        if proc.returncode or not out.exists():
            raise RuntimeError(f"guidellm exited {proc.returncode}: {text.decode(errors='replace')[-1500:]}")
        report = json.loads(out.read_text())
        if len(report["benchmarks"]) != rounds:
            raise RuntimeError(f"guidellm ran {len(report['benchmarks'])} benchmarks, not {rounds}")
        return [guidellm_numbers(report, i) for i in range(rounds)]


async def run_outside(cfg, fx, server, threads: int) -> dict:
    """Both clients against one swapserve server (``server``, a running bench.http.ServerProcess, left running),
    base model and one adapter, ``cfg.rounds`` rounds each."""
    from bench.http import BASE, HttpDriver

    if shutil.which("guidellm", path=str(Path(sys.executable).parent)) is None and shutil.which("guidellm") is None:
        raise RuntimeError("guidellm is not installed: `pip install -e .[bench]` (make bench does)")
    s, r, p, m = cfg.guidellm_streams, cfg.guidellm_requests, cfg.prompt_tokens, cfg.peer_max_tokens or cfg.max_tokens
    adapter = next(iter(fx.cell))
    driver = HttpDriver(server)
    rows = {}
    try:
        await load_and_warm(driver, {adapter: str(fx.cell[adapter])}, fx.prompts)
        for model, name in ((BASE, None), (adapter, adapter)):
            ours = []
            before = await driver.itl_totals()
            for _ in range(cfg.rounds):
                reqs = cell_requests(fx.prompts.take(r), [name], m)  # fresh prompts: no prefix-cache hits
                ours.append(summarize(await run_streams(driver, reqs, s)))
            between = await driver.itl_totals()
            theirs = await run_guidellm(server.url, model, fx.model_dir, s, r, p, m, cfg.rounds)
            after = await driver.itl_totals()
            rows["base" if name is None else "adapter"] = {
                "model": model, "swapserve_client": ours, "guidellm": theirs,
                # what the server itself measured while each client ran: tells a client that measures differently
                # from a server that ran slower during that client's run (another process's CPU share on 2 CPUs)
                "server_itl_ms": {"swapserve_client": mean_gap_ms(before, between),
                                  "guidellm": mean_gap_ms(between, after)},
                # the rounds are not paired (ours all run first): the ratio of the two medians
                "ratio": median_range([median(g["tok_s"] for g in theirs) / median(o["tok_s"] for o in ours)])}
            log.info("outside client on %s: ours %s, guidellm %s tok/s", model,
                     [round(o["tok_s"], 1) for o in ours], [round(g["tok_s"], 1) for g in theirs])
    finally:
        await driver.close()
    return {"streams": s, "requests": r, "prompt_tokens": p, "output_tokens": m, "rounds": cfg.rounds,
            "threads": threads, "rows": rows}


def mean_gap_ms(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The mean inter-token gap (ms) the server recorded between two HttpDriver.itl_totals readings."""
    count = after[1] - before[1]
    return 1000 * (after[0] - before[0]) / count if count > 0 else None


def outside_section(results: dict) -> list[str]:
    from bench.numbers import fixed, rounds_cells, spread

    o = results.get("outside")
    if not o:
        error = results.get("outside_error")
        return ["## GuideLLM as an outside client", "", f"Not measured in this run: {error}", ""] if error else []
    lines = ["## GuideLLM as an outside client", "",
             f"The same workload measured by [GuideLLM](https://github.com/vllm-project/guidellm) and by this "
             f"harness's client, against one `python -m server serve`: {o['streams']} concurrent streams (each "
             f"sends its next request when its last finished: GuideLLM's `concurrent` profile), {o['requests']} "
             f"requests of {o['prompt_tokens']} prompt and {o['output_tokens']} output tokens (`ignore_eos`), "
             f"{o['rounds']} rounds each (ours, then GuideLLM's as the benchmarks of one `guidellm run`); tok/s "
             "as median (min–max), latency medians in ms. GuideLLM's "
             "prompts are synthetic text of that many tokens, ours token ids; it runs its streams in one worker "
             "process (`GUIDELLM__MAX_WORKER_PROCESSES=1`), as our client runs them on one event loop. GuideLLM / "
             "ours: the ratio of the two medians (the rounds are not paired). *Server ITL*: the mean inter-token "
             "gap the server itself recorded (its `vllm:inter_token_latency_seconds`) over that client's rounds: "
             "where the two clients' ITLs differ and the server's own figures differ alike, the server ran slower "
             "during that client's run (the client's own CPU use among them, on this machine's CPUs), not that "
             "the clients measure differently.", "",
             "| model | client | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | server ITL "
             "| GuideLLM / ours |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row, r in o["rows"].items():
        for client, label in (("swapserve_client", "this harness"), ("guidellm", "GuideLLM")):
            runs = r[client]
            server_itl = fixed((r.get("server_itl_ms") or {}).get(client))
            lines.append(f"| {r['model']} | {label} | {rounds_cells(runs)} | {server_itl} | "
                         + (f"**{spread(r['ratio'], '{:.2f}', 'x')}**" if client == "guidellm" else "") + " |")
    return lines + [""]
