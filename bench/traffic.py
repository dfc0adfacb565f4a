"""Real traffic (issues 15 and 20): four workloads through the in-process AsyncEngine (bench.drivers'
EngineDriver: greedy, ``ignore_eos``, a fixed output length per request; TTFT and ITL from stream timestamps).
Sizes come from TrafficConfig (bench/config.py); prompts are random token ids (bench/request_set.py).

    long_one  (a) ``requests`` prompts of ``short_prompt`` tokens sent together (cell A), and the same with
              request 0's prompt ``long_prompt`` tokens long (cell B), rounds interleaved A, B, A, B: wall time
              of each, B / A, and the short requests' TTFT and ITL in each
    prefix    (b) a ``prefix_tokens`` prefix and a distinct tail: request 1, then, once it finished, request 2 on
              the same prefix: the TTFT of each, their ratio, num_cached_tokens; a fresh prefix every round
    poisson   (c) RequestSet.long_tailed, first all at once on the base model (its capacity, and the run HF's
              static batches stand beside), then with Poisson arrivals at ``loads`` x that capacity (or at
              ``rates``) over ``adapters`` adapters round-robin: throughput, TTFT / ITL, goodput under the SLO,
              KV high-water mark, preemptions and prefix hits
    wide      (d) ``wide_requests`` requests on as many distinct adapters vs the same requests on the base
              model, interleaved rounds: the throughput ratio

(a)-(c) share one engine (``max_num_seqs``; ``max_loras`` = ``adapters``); (d) has its own (max_num_seqs =
max_loras = ``wide_requests``). Everything else is the engine's default, so each version runs as it ships.

``python -m bench.traffic --out result.json [--server-src DIR] [--spec spec.json | bench.run's flags]`` runs
them on the ``server`` package in DIR (another commit's checkout: bench/baseline.py) with ``bench`` from this
tree; without --spec it makes its own fixtures (the model of --model, adapter copies) and sizes (--quick,
--traffic FIELD=VALUE).
Nothing here imports ``server`` at module level: main() puts DIR first on sys.path before anything does.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import server_api
from bench.config import TrafficConfig, parse_args, setup_logging
from bench.drivers import BenchRequest, EngineDriver, cell_requests, load_and_warm, run_arrivals, run_concurrent
from bench.probe import EngineProbe
from bench.report import loadavg
from bench.request_set import PromptSource, RequestSet, poisson_offsets, random_prompt, rng_for, round_robin
from bench.timing import goodput, median_range, summarize

log = logging.getLogger("bench")


@dataclass
class TrafficSpec:
    """One traffic run's inputs as plain data (it crosses into a subprocess as JSON)."""

    model_dir: str
    adapters: dict[str, str]  # name -> directory: (a) and (c) take the first ``adapters``, (d) ``wide_requests``
    adapter_root: str  # a directory above every adapter (the engine's --adapter-root)
    traffic: dict = field(default_factory=dict)  # TrafficConfig fields
    lora_rank: int = 16
    threads: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    quantization: str = "none"
    seed: int = 0
    label: str = "this tree"  # for the log; the report names an engine by its KV cache (v1 dense, v2 paged)
    commit: str = ""

    @property
    def config(self) -> TrafficConfig:
        return TrafficConfig(**self.traffic)


def engine_settings(spec: TrafficSpec, wide: bool) -> dict:
    """EngineConfig fields of the (a)-(c) engine or of (d)'s; 0 in TrafficConfig = the engine's default."""
    cfg = spec.config
    seqs = cfg.wide_requests if wide else cfg.max_num_seqs
    loras = cfg.wide_requests if wide else max(1, cfg.adapters)
    out = dict(model=spec.model_dir, dtype=spec.dtype, device=spec.device, quantization=spec.quantization,
               threads=spec.threads, seed=spec.seed, max_loras=loras, max_cpu_loras=max(64, loras),
               max_lora_rank=spec.lora_rank, max_num_seqs=seqs, adapter_roots=[spec.adapter_root],
               max_model_len=cfg.short_prompt + cfg.max_tokens + 8 if wide else cfg.max_model_len,
               max_waiting=max(256, cfg.poisson_requests, cfg.wide_requests))
    if cfg.max_num_batched_tokens:
        out["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    return out


@contextlib.asynccontextmanager
async def serving(spec: TrafficSpec, wide: bool, adapters: dict[str, str]):
    """An engine of ``engine_settings``, its adapters loaded and warm; yields (driver, probe, vocab, about)."""
    config, dropped = server_api.engine_config(**engine_settings(spec, wide))
    engine = server_api.engine_class()(config)
    await engine.start()
    try:
        await server_api.kv_resident(engine)
        driver, probe = EngineDriver(engine), EngineProbe(engine, spec.config.poll_s)
        vocab = len(engine.tokenizer)
        await load_and_warm(driver, adapters, PromptSource(vocab, 8, spec.seed))
        about = {**server_api.describe(engine), "dropped_settings": dropped}
        log.info("traffic engine (%s): %s", spec.label, about)
        yield driver, probe, vocab, about
    finally:
        await engine.shutdown(5)


def _medians(rows: list[dict], paths: dict[str, tuple]) -> dict:
    """name -> median_range over the rounds of the value at ``path`` (keys into each row)."""
    def get(row, path):
        for key in path:
            row = row.get(key) if isinstance(row, dict) else None
        return row

    return {name: median_range([get(r, path) for r in rows]) for name, path in paths.items()}


async def long_one(driver, cfg: TrafficConfig, adapters: list[str], vocab: int, seed: int) -> dict:
    """(a): cells A (all short) and B (request 0 long), ``rounds`` times interleaved. ``A_short`` and
    ``B_short`` summarize requests 1.. only (the short ones in both cells). Cell L, the long prompt alone with
    one output token (its prefill), gives the round's work-conserving bound: B can not take less than A + L on
    cores that A already keeps busy, so ``bound`` = (A + L) / A is the least B / A can be, and ``over_bound``
    = B / (A + L) is what the engine adds to it. L is one prefill of a fixed length, the same work every round:
    it is measured in the first round and used for every round's bound."""
    names = round_robin(adapters or [None], cfg.requests)
    rows, alone = [], None
    for r in range(cfg.rounds):
        row: dict = {"round": r + 1, "load_start": loadavg()}
        for cell in ("A", "B"):
            rng = rng_for(seed, "long-one", r, cell)
            lengths = [cfg.long_prompt if cell == "B" and i == 0 else cfg.short_prompt for i in range(cfg.requests)]
            reqs = [BenchRequest(random_prompt(rng, n, vocab), a, cfg.max_tokens) for n, a in zip(lengths, names)]
            traces = await run_concurrent(driver, reqs)
            row[cell], row[cell + "_short"] = summarize(traces), summarize(traces[1:])
            row[cell + "_first_ttft_ms"] = traces[0].ttft * 1e3
        if alone is None:
            rng = rng_for(seed, "long-one", r, "L")
            alone = summarize(await run_concurrent(
                driver, [BenchRequest(random_prompt(rng, cfg.long_prompt, vocab), names[0], 1)]))
        row["L"] = alone
        a_s, b_s, l_s = row["A"]["seconds"], row["B"]["seconds"], row["L"]["seconds"]
        row.update(ratio=b_s / a_s, bound=(a_s + l_s) / a_s, over_bound=b_s / (a_s + l_s), load_end=loadavg())
        log.info("traffic (a) round %d: A %.1fs, B %.1fs (B/A %.2f), the long prompt alone %.1fs (bound %.2f)",
                 r + 1, a_s, b_s, row["ratio"], l_s, row["bound"])
        rows.append(row)
    paths = {"wall_A_s": ("A", "seconds"), "wall_B_s": ("B", "seconds"), "ratio": ("ratio",),
             "wall_L_s": ("L", "seconds"), "bound": ("bound",), "over_bound": ("over_bound",),
             "long_ttft_ms": ("B_first_ttft_ms",)}
    for cell in ("A", "B"):
        for stat in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            paths[f"short_{stat}_{cell}"] = (cell + "_short", stat)
    return {"requests": cfg.requests, "short_prompt": cfg.short_prompt, "long_prompt": cfg.long_prompt,
            "max_tokens": cfg.max_tokens, "adapters": len(set(names) - {None}), "rounds": rows, "l_rounds": 1,
            **_medians(rows, paths)}


async def _first_token(driver: EngineDriver, req: BenchRequest) -> tuple[float, int | None]:
    """(TTFT in s, the prompt tokens the engine served from its prefix cache; None where it does not say)."""
    sent, ttft, cached = time.perf_counter(), None, None
    async for out in driver.outputs(req):
        if ttft is None and out.token_ids:
            ttft = time.perf_counter() - sent
        cached = getattr(out, "num_cached_tokens", None)
    return ttft, cached


async def prefix(driver, cfg: TrafficConfig, vocab: int, seed: int) -> dict:
    """(b) on the base model: per round a fresh prefix, request 1 to its end, then request 2."""
    rows = []
    for r in range(cfg.rounds):
        rng = rng_for(seed, "prefix", r)
        shared = random_prompt(rng, cfg.prefix_tokens, vocab)
        (t1, c1), (t2, c2) = [await _first_token(driver, BenchRequest(
            shared + random_prompt(rng, cfg.prefix_tail, vocab), None, cfg.prefix_max_tokens)) for _ in range(2)]
        rows.append({"round": r + 1, "ttft_first_ms": t1 * 1e3, "ttft_second_ms": t2 * 1e3, "ratio": t2 / t1,
                     "cached_first": c1, "cached_second": c2})
        log.info("traffic (b) round %d: TTFT %.0f -> %.0f ms (%.2f), cached %s", r + 1, t1 * 1e3, t2 * 1e3, t2 / t1, c2)
    paths = {k: (k,) for k in ("ttft_first_ms", "ttft_second_ms", "ratio", "cached_first", "cached_second")}
    return {"prefix_tokens": cfg.prefix_tokens, "tail_tokens": cfg.prefix_tail, "max_tokens": cfg.prefix_max_tokens,
            "rounds": rows, **_medians(rows, paths)}


async def poisson_run(driver, probe: EngineProbe, cfg: TrafficConfig, rs: RequestSet, adapters: list,
                      rate: float | None, vocab: int, seed: int, run: str) -> dict:
    """One pass over the set: Poisson arrivals at ``rate`` requests/s, or all at once (``rate`` None)."""
    reqs = [BenchRequest(p, a, m) for p, a, m in zip(rs.prompts(vocab, seed, run), round_robin(adapters, len(rs)),
                                                     rs.output_lens)]
    offsets = poisson_offsets(rs.gaps, rate) if rate else [0.0] * len(rs)
    load_start = loadavg()
    async with probe.watch() as seen:
        traces = await run_arrivals(driver, reqs, offsets)
    out = summarize(traces)
    out.update(rate=rate, req_s=len(traces) / out["seconds"], adapters=len(set(adapters) - {None}),
               goodput=goodput(traces, cfg.slo_ttft_s, cfg.slo_itl_s), load_start=load_start, load_end=loadavg(),
               **seen)
    log.info("traffic (c) %s: %.1f tok/s, %.2f req/s, TTFT p50 %.0f ms, goodput %.0f%%", run, out["tok_s"],
             out["req_s"], out["ttft_p50_ms"], 100 * out["goodput"]["share"])
    return out


async def poisson(driver, probe: EngineProbe, cfg: TrafficConfig, adapters: list[str], vocab: int, seed: int) -> dict:
    """(c): the base model all at once (the capacity), then every rate over the adapters."""
    rs = RequestSet.long_tailed(cfg, seed)
    base = await poisson_run(driver, probe, cfg, rs, [None], None, vocab, seed, "base-all-at-once")
    capacity = base["req_s"]
    rates = cfg.rates or [load * capacity for load in cfg.loads]
    runs = []
    for i, rate in enumerate(rates):
        run = await poisson_run(driver, probe, cfg, rs, adapters or [None], rate, vocab, seed, f"rate-{i}")
        runs.append({**run, "load": rate / capacity})
    return {"set": rs.describe(), "base_all_at_once": base, "capacity_req_s": capacity, "rates": runs}


async def wide(driver, cfg: TrafficConfig, adapters: list[str], vocab: int, seed: int) -> dict:
    """(d): ``wide_requests`` requests on as many adapters, then on the base model, ``rounds`` times."""
    n, rows = cfg.wide_requests, []
    for r in range(cfg.rounds):
        row: dict = {"round": r + 1, "load_start": loadavg()}
        for cell, names in (("adapters", adapters[:n]), ("base", [None])):
            rng = rng_for(seed, "wide", r, cell)
            prompts = [random_prompt(rng, cfg.short_prompt, vocab) for _ in range(n)]
            row[cell] = summarize(await run_concurrent(driver, cell_requests(prompts, names, cfg.max_tokens)))
        row.update(ratio=row["adapters"]["tok_s"] / row["base"]["tok_s"], load_end=loadavg())
        log.info("traffic (d) round %d: %d adapters %.1f tok/s, base %.1f tok/s (%.2f)", r + 1, len(adapters[:n]),
                 row["adapters"]["tok_s"], row["base"]["tok_s"], row["ratio"])
        rows.append(row)
    paths = {"adapters_tok_s": ("adapters", "tok_s"), "base_tok_s": ("base", "tok_s"), "ratio": ("ratio",)}
    return {"requests": n, "adapters": len(adapters[:n]), "prompt": cfg.short_prompt, "max_tokens": cfg.max_tokens,
            "rounds": rows, **_medians(rows, paths)}


async def run_traffic(spec: TrafficSpec) -> dict:
    """Every workload on the ``server`` package imported here; one results dict (the JSON's traffic run)."""
    import torch

    cfg = spec.config
    torch.set_num_threads(spec.threads)
    names = list(spec.adapters)
    mixed = {n: spec.adapters[n] for n in names[:cfg.adapters]}
    out = {"label": spec.label, "commit": spec.commit, "server": server_api.server_dir(), "threads": spec.threads,
           "load_start": loadavg()}
    async with serving(spec, False, mixed) as (driver, probe, vocab, about):
        out["engine"] = about
        out["long_one"] = await long_one(driver, cfg, list(mixed), vocab, spec.seed)
        out["prefix"] = await prefix(driver, cfg, vocab, spec.seed)
        out["poisson"] = await poisson(driver, probe, cfg, list(mixed), vocab, spec.seed)
    wide_names = names[:cfg.wide_requests]
    async with serving(spec, True, {n: spec.adapters[n] for n in wide_names}) as (driver, _, vocab, about):
        out["wide_engine"] = about
        out["wide"] = await wide(driver, cfg, wide_names, vocab, spec.seed)
    out["load_end"] = loadavg()
    return out


def own_spec(bench, root: Path) -> TrafficSpec:
    """Fixtures for a standalone run (a BenchConfig from bench.run's flags): its model and cheap copies of
    one PEFT save as adapters."""
    import torch

    from bench.config import auto_threads
    from bench.fixtures import copy_adapters, make_adapters, model_dir

    cfg = bench.traffic
    directory = model_dir(bench.model, bench.cache_dir)
    template = make_adapters(directory, ["template"], root / "template", bench.lora_rank, bench.seed)["template"]
    names = [f"t{i:02d}" for i in range(max(cfg.adapters, cfg.wide_requests))]
    made = copy_adapters(template, names, root / "adapters", bench.seed)
    torch.set_num_threads(bench.threads or auto_threads())
    return TrafficSpec(str(directory), {n: str(p) for n, p in made.items()}, str(root / "adapters"), asdict(cfg),
                       bench.lora_rank, torch.get_num_threads(), bench.dtype, bench.device, bench.quantization,
                       bench.seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__, epilog="Without --spec, "
                                "every other flag is bench.run's (--quick, --model, --threads, --traffic F=V, ...)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="where to write the run's JSON")
    p.add_argument("--server-src", type=Path, help="a directory holding the server/ package to measure")
    p.add_argument("--spec", type=Path, help="a TrafficSpec JSON (bench/baseline.py writes one)")
    args, rest = p.parse_known_args(argv)
    if args.server_src:
        sys.path.insert(0, str(args.server_src.resolve()))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as bench.run: the model and adapters are local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    if args.server_src and not server_api.server_dir().startswith(str(args.server_src.resolve())):
        sys.exit(f"bench.traffic: `import server` found {server_api.server_dir()}, not {args.server_src}")
    with tempfile.TemporaryDirectory(prefix="swapserve-traffic-") as tmp:
        if args.spec:
            spec = TrafficSpec(**json.loads(args.spec.read_text()))
        else:
            spec = own_spec(parse_args(rest), Path(tmp))
            spec.label = str(args.server_src or "this tree")
        result = asyncio.run(run_traffic(spec))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
