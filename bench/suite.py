"""One benchmark run: build the fixtures, start swapserve beside the anchors, measure every cell, then the
swap costs. Everything runs in one process, one system at a time, so the ratios share the machine's state."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.anchors import Anchors
from bench.baseline import run_baseline, short_commit
from bench.config import BenchConfig, auto_threads
from bench.drivers import Driver, EngineDriver, cell_requests, load_and_warm, run_concurrent
from bench.fixtures import adapter_bytes, copy_adapters, make_adapters, make_typed_adapters, model_dir
from bench.memory import model_memory
from bench.report import loadavg, machine_git
from bench.request_set import PromptSource, RequestSet
from bench import server_api
from bench.scale import TypesCells, run_scale
from bench.mixtures import run_mixtures
from bench.structured import run_structured
from bench.swap import interference, swap_costs
from bench.timing import SectionClock, summarize
from bench.traffic import TrafficSpec, run_traffic
from server import progress

log = logging.getLogger("bench")


@dataclass
class Fixtures:
    model_dir: Path
    cell: dict[str, Path]  # the adapters the cells use: a00, a01, ...
    pool: dict[str, Path]  # fresh adapters for swap costs and load interference: s00, ...
    on_demand: list[str]  # adapters left on disk, first requested by name: o00, ...
    prompts: PromptSource  # fresh prompts for every measured run (no prefix-cache hits between runs)
    typed: dict[str, Path]  # IA3 / DoRA / AdaLoRA adapters for the types cells: i00.., d00.., ad00..
    kinds: dict[str, str]  # typed adapter -> its kind
    scale: list[str]  # the scale run's adapters, on disk under scale_root, in Zipf rank order
    scale_root: Path | None


TYPED = (("i", "ia3"), ("d", "dora"), ("ad", "adalora"))


def build_fixtures(cfg: BenchConfig, root: Path) -> Fixtures:
    from transformers import AutoTokenizer

    directory = model_dir(cfg.model, cfg.cache_dir)
    pool_size = max(cfg.swap_samples, cfg.interference_loads)
    names = ([f"a{i:02d}" for i in range(cfg.max_adapters)] + [f"s{i:02d}" for i in range(pool_size)]
             + [f"o{i:02d}" for i in range(cfg.swap_samples)])
    start = time.perf_counter()
    made = make_adapters(directory, names, root, cfg.lora_rank, cfg.seed)
    log.info("made %d PEFT adapters (%.1f MB each) in %.1fs", len(made), adapter_bytes(made[names[0]]) / 1e6,
             time.perf_counter() - start)
    kinds: dict[str, str] = {}
    typed: dict[str, Path] = {}
    if not cfg.skip_types:
        per = max(1, cfg.types_adapters // 4)
        for prefix, kind in TYPED:
            kinds.update({f"{prefix}{i:02d}": kind for i in range(cfg.types_adapters if kind == "ia3" else per)})
        start = time.perf_counter()
        typed = make_typed_adapters(directory, kinds, root, cfg.lora_rank, cfg.seed)
        log.info("made %d IA3/DoRA/AdaLoRA adapters in %.1fs", len(typed), time.perf_counter() - start)
    scale, scale_root = [], None
    if not cfg.skip_scale:
        start = time.perf_counter()
        scale_root = root / "scale"
        template = made[names[0]]
        if cfg.scale_rank != cfg.lora_rank:
            template = make_adapters(directory, ["scale-template"], root / "template", cfg.scale_rank, cfg.seed)[
                "scale-template"]
        scale = [f"z{i:03d}" for i in range(cfg.scale_adapters)]
        copy_adapters(template, scale, scale_root, cfg.seed)
        log.info("wrote %d scale adapters (%.1f MB each) in %.1fs", len(scale),
                 adapter_bytes(scale_root / scale[0]) / 1e6, time.perf_counter() - start)
    vocab = len(AutoTokenizer.from_pretrained(directory))
    return Fixtures(directory, {n: p for n, p in made.items() if n[0] == "a"},
                    {n: p for n, p in made.items() if n[0] == "s"}, [n for n in names if n[0] == "o"],
                    PromptSource(vocab, cfg.prompt_tokens, cfg.seed), typed, kinds, scale, scale_root)


def engine_config(cfg: BenchConfig, fx: Fixtures, root: Path):
    from server.config import EngineConfig

    n = max(cfg.max_concurrency, cfg.interference_streams, cfg.peer_concurrency * cfg.peers)
    return EngineConfig(model=str(fx.model_dir), dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization,
                        threads=torch.get_num_threads(), max_loras=cfg.max_adapters,
                        max_cpu_loras=max(64, len(fx.cell) + len(fx.pool) * (1 + cfg.interference_rounds)
                                          + len(fx.on_demand) + len(fx.typed)),
                        max_lora_rank=cfg.lora_rank, max_num_seqs=n,
                        max_model_len=cfg.prompt_tokens + max(cfg.max_tokens, 32) + 8,
                        max_num_batched_tokens=max(2048, n * cfg.prompt_tokens), adapter_roots=[str(root)],
                        seed=cfg.seed)


BASE_ANCHORS = ("base", "base_onednn")


def target_cell(cfg: BenchConfig) -> tuple[int, int]:
    """The cell the headline's targets are set on (32 x 16), or the grid's largest where it has no such cell."""
    from bench.markdown import pick_target

    return pick_target(cfg.cells)


def runs_adapters(cfg: BenchConfig, round_index: int, cell: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether swapserve runs on the cell's adapters in this grid round: always in the first, and later only in
    the target cell with --grid-later-rounds target."""
    return round_index == 0 or cfg.grid_later_rounds == "all" or cell == target


async def measure_cell(cfg: BenchConfig, fx: Fixtures, anchors: Anchors | None, driver: Driver,
                       n: int, k: int, with_base_engine: bool, slow_anchors: bool = True,
                       base_rows: dict | None = None, with_adapters: bool = True, peft_naive: bool = True) -> dict:
    """One (concurrency, adapters) cell, systems back to back. Request i uses adapter i % k. ``slow_anchors``:
    also PEFT's mixed batch, the naive serial flow and stock HF (the grid runs them in its first round only: no
    target is set on them, at 64 adapters PEFT alone takes longer than every other system of the cell together,
    and the headline's anchor is HF on the oneDNN-packed linears, which runs every round; stock HF runs every
    round only where there is no packed anchor).
    ``base_rows``: the HF base-model anchors (BASE_ANCHORS) another cell of this N measured in this round; they
    run N prompts of the same lengths whatever k is, so they are taken over rather than run again.
    ``with_adapters`` False: swapserve on the cell's adapters is left out (a later round of a cell no headline
    ratio rests on, with ``--grid-later-rounds target``); the anchors and the no-adapter run still go.
    ``peft_naive`` False: PEFT's mixed batch and the naive flow are left out even with ``slow_anchors`` (a cell
    other than the target with ``--peft-naive-cells target``)."""
    prompts_n, m = fx.prompts.take(n), cfg.max_tokens  # every system of the cell: the same (fresh) prompts
    adapters = list(fx.cell)[:k]
    rows = [adapters[i % k] for i in range(n)]
    row: dict = {"concurrency": n, "adapters": k}
    if anchors and base_rows:
        row.update(base_rows)
    elif anchors:  # the equal-GEMM anchor, where there is one, every round; stock HF with the slow ones
        row.update(anchors.base_summaries(prompts_n, m, stock=slow_anchors))
    if with_adapters:
        row["swapserve"] = summarize(await run_concurrent(driver, cell_requests(prompts_n, adapters, m)))
    if with_base_engine:
        row["swapserve_no_adapter"] = summarize(await run_concurrent(driver, cell_requests(prompts_n, [None], m)))
    if anchors and slow_anchors and peft_naive:
        row["peft"] = summarize(anchors.peft_mixed(prompts_n, rows, m))
        c = min(n, cfg.naive_requests)
        row["naive"] = naive_summary(anchors.naive(prompts_n[:c], rows[:c], m), n)
    _log_cell(row)
    return row


GRID_SYSTEMS = ("base", "base_onednn", "swapserve", "swapserve_no_adapter", "peft", "naive")


def combine_rounds(rows: list[dict]) -> dict:
    """One cell's rounds as one row: every system's numbers are the medians over the rounds, with each round's
    tok/s kept (``round_tok_s``), and ``round_ratios``: swapserve over each anchor, round by round (a ratio's
    median is taken over rounds, not between two medians)."""
    out = {"concurrency": rows[0]["concurrency"], "adapters": rows[0]["adapters"], "rounds": len(rows)}
    for key in GRID_SYSTEMS:
        runs = [r[key] for r in rows if key in r]
        if runs:
            out[key] = median_summary(runs)
    out["round_ratios"] = {den: [r["swapserve"]["tok_s"] / r[den]["tok_s"] for r in rows
                                 if "swapserve" in r and den in r and r[den].get("tok_s")]
                           for den in GRID_SYSTEMS if den != "swapserve" and den in out}
    out["no_adapter_round_ratios"] = [r["swapserve_no_adapter"]["tok_s"] / r["base_onednn"]["tok_s"] for r in rows
                                      if "swapserve_no_adapter" in r and r.get("base_onednn", {}).get("tok_s")]
    return out


def types_result(types: TypesCells) -> dict:
    """The types cells' rounds (bench.scale.TypesCells.rows) as results["types"]: one row per cell as
    combine_rounds makes the grid's, and the host bytes per adapter type."""
    return {"cells": [{**combine_rounds(rows), "cell": label, "kinds": rows[0]["kinds"]}
                      for label, rows in types.rows.items()], "host_bytes": types.host_bytes()}


def median_summary(runs: list[dict]) -> dict:
    """Summaries of one system's rounds as one: every float field the median over the rounds, and each round's
    tok/s kept (``round_tok_s``)."""
    from statistics import median

    merged = dict(runs[0])
    for field, value in runs[0].items():
        values = [run.get(field) for run in runs]
        if isinstance(value, float) and all(isinstance(v, (int, float)) for v in values):
            merged[field] = median(values)
    merged["round_tok_s"] = [run.get("tok_s") for run in runs]
    return merged


def naive_summary(traces, n: int) -> dict:
    """The serial flow ran len(traces) of the n requests; its TTFT for all n queued requests is projected:
    request i waits for the i before it (each takes the measured mean service time)."""
    from bench.timing import percentile_ms

    out = summarize(traces)
    service = out["seconds"] / len(traces)
    own = traces[0].ttft
    queued = [i * service + own for i in range(n)]
    return out | {"ran_requests": len(traces), "of_requests": n, "measured_ttft_p50_ms": out["ttft_p50_ms"],
                  "ttft_p50_ms": percentile_ms(queued, 50), "ttft_p99_ms": percentile_ms(queued, 99)}


def _log_cell(row: dict) -> None:
    parts = [f"{name}={row[name]['tok_s']:.1f}" for name in ("base", "base_onednn", "swapserve",
                                                              "swapserve_no_adapter", "peft", "naive") if name in row]
    log.info("cell N=%d k=%d tok/s: %s", row["concurrency"], row["adapters"], " ".join(parts))


async def warm_up(driver: Driver, fx: Fixtures, cfg: BenchConfig) -> None:
    """Host-load the cell adapters, then one short request per adapter (fills the device slots)."""
    await load_and_warm(driver, fx.cell, fx.prompts)


async def run_suite(cfg: BenchConfig) -> dict:
    from server.engine.async_engine import AsyncEngine

    if cfg.traffic_baseline and not cfg.skip_traffic:
        cfg.traffic_baseline = short_commit(cfg.traffic_baseline)  # a bad commit fails now, not after the grid
    torch.set_num_threads(cfg.threads or auto_threads())
    log.info("torch threads: %d (load average %.2f, %d CPUs)", torch.get_num_threads(), os.getloadavg()[0],
             os.cpu_count())
    clock = SectionClock()
    memory = []
    with tempfile.TemporaryDirectory(prefix="swapserve-bench-") as tmp:
        root = Path(tmp)
        with clock.section("setup"):  # fixtures, the HF/PEFT anchors, the in-process engine
            sizing, directory = None, model_dir(cfg.model, cfg.cache_dir)  # a GGUF is converted once, here
            if not cfg.skip_memory and cfg.device == "cpu":  # plain / int8 / nf4 subprocesses: RSS, never timed,
                # so they run beside the fixtures (nothing is timed before the grid)
                sizing = asyncio.create_task(model_memory(str(directory)))
            try:
                fx = await asyncio.to_thread(build_fixtures, cfg, root)
            except BaseException:
                if sizing is not None:
                    sizing.cancel()
                raise
            if sizing is not None:
                memory = await sizing
                log.info("model RSS: %s", {m["quantization"]: round(m.get("model_rss", 0) / 1e6) for m in memory})
            anchors, peft_load = None, []
            if not cfg.skip_anchors:
                anchors = Anchors(fx.model_dir, fx.cell, cfg.device, cfg.dtype, cfg.quantization)
                peft_load = anchors.load_adapter_seconds(dict(list(fx.pool.items())[:cfg.swap_samples]))
            server, results = None, {}
            if not cfg.skip_http or cfg.peers or cfg.guidellm:  # up before the grid, which runs its HTTP cell;
                server = spawn_server(cfg, fx, root)  # it starts beside the engine (nothing timed meanwhile)
            try:
                start = time.perf_counter()
                engine = AsyncEngine(engine_config(cfg, fx, root))
                await engine.start()
                await server_api.kv_resident(engine)
                log.info("swapserve engine up in %.1fs", time.perf_counter() - start)
            except BaseException:
                if server is not None:
                    server.close()
                raise
        try:
            try:
                if server is not None:
                    await server_ready(server, clock)
                results = await _measure(cfg, fx, anchors, engine, peft_load, clock, server)
            finally:
                await engine.shutdown(5)
            del engine
            if server is not None:
                # this process is the HTTP client from here: the engine's stop thawed the heap it froze (HF/PEFT
                # anchors, fixtures), and a full collection over it mid-run stalled the client's stream reads
                # (the interference's quiet ITL p99 read 326-1060 ms against a p50 of ~160-180: rises of -33% to
                # -75% with one round); collected and frozen, the client takes no such pause
                gc.collect()
                gc.freeze()
                await http_sections(cfg, fx, server, results, clock)
        finally:
            if server is not None:
                with clock.section("serve"):  # its CPU time over every section is counted when it exits
                    server.close()
                if not any(key in results for key in ("peers_error", "outside_error")):
                    Path(server.log.name).unlink()  # kept when a section failed
        if fx.scale:
            with clock.section("scale"):
                results["scale"] = await run_scale(cfg, fx.model_dir, fx.scale_root, fx.scale,
                                                   fx.prompts, anchors)
        if memory:
            results["memory"] = {"models": memory, "adapter": results.get("scale", {}).get("tiers")}
        if not cfg.skip_traffic:
            with clock.section("traffic"):
                results["traffic"] = await run_traffic_section(cfg, fx, root, anchors)
        return {"section_seconds": clock.seconds, "section_cpu_seconds": clock.cpu_seconds, **results}


async def _optional(results: dict, key: str, label: str, coro) -> None:
    """A section that needs outside tools (a C++ toolchain, another client): its failure is logged and
    recorded (``<key>_error``, shown in BENCHMARKS.md) and the rest of the run's results are kept."""
    try:
        results[key] = await coro
    except (RuntimeError, OSError, ValueError) as e:
        log.error("%s failed: %s", label, e)
        results[f"{key}_error"] = str(e)


def server_args(cfg: BenchConfig, fx: Fixtures, root: Path) -> list[str]:
    """`python -m server serve` flags for the engine the in-process grid runs on."""
    ec = engine_config(cfg, fx, root)
    return ["--model", ec.model, "--dtype", ec.dtype, "--device", ec.device, "--quantization", ec.quantization,
            "--max-loras", str(ec.max_loras), "--max-cpu-loras", str(ec.max_cpu_loras),
            "--max-lora-rank", str(ec.max_lora_rank), "--max-num-seqs", str(ec.max_num_seqs),
            "--max-model-len", str(ec.max_model_len), "--max-num-batched-tokens", str(ec.max_num_batched_tokens),
            "--adapter-root", str(root), "--seed", str(ec.seed)]


def spawn_server(cfg: BenchConfig, fx: Fixtures, root: Path):
    """`python -m server serve` on the in-process engine's settings (bench/http.py), one server for every section
    that drives HTTP: the grid's HTTP cell, load interference, the peers and GuideLLM. Started, not waited for
    (server_ready): its start (imports, model load, packing, ~10-20 s on 2 CPUs) runs beside the in-process
    engine's; idle, it takes no CPU from the in-process runs beside it."""
    from bench.http import ServerProcess

    log_path = Path(tempfile.mkstemp(prefix="swapserve-bench-server-", suffix=".log")[1])
    return ServerProcess(server_args(cfg, fx, root), log_path, torch.get_num_threads())


async def server_ready(server, clock: SectionClock) -> None:
    with clock.section("serve"):
        await server.wait_ready()
        log.info("HTTP server up %.1fs after its start (port %d)", time.perf_counter() - server.started, server.port)


async def http_sections(cfg: BenchConfig, fx: Fixtures, server, results: dict, clock: SectionClock) -> None:
    """The sections after the grid that drive the server over HTTP: load interference (this module's
    run_http), the peers, GuideLLM; each warms the adapters it uses before it measures anything."""
    if "http" in results:
        with clock.section("http"):
            results["http"]["interference"] = await run_http_interference(cfg, fx, server)
    if cfg.peers:
        from bench.peers import run_peers

        with clock.section("peers"):
            await _optional(results, "peers", "peers (llama-server)", run_peers(cfg, fx, server,
                                                                                torch.get_num_threads()))
    if cfg.guidellm:
        from bench.outside import run_outside

        with clock.section("guidellm"):
            await _optional(results, "outside", "GuideLLM", run_outside(cfg, fx, server, torch.get_num_threads()))


def http_cell(runs: list[dict], rows: list[dict], n: int, k: int) -> dict:
    """The grid's HTTP cell: one run per round (``runs``), each beside that round's in-process run of the same
    cell (``rows``, its row of each round); ``round_ratios``: each HTTP run over that round's run of each system
    (swapserve in-process, HF at equal GEMM, stock HF where that round ran it): drift between rounds cancels."""
    ratios = {den: [run["tok_s"] / row[den]["tok_s"] for run, row in zip(runs, rows) if row.get(den, {}).get("tok_s")]
              for den in ("swapserve", *BASE_ANCHORS)}
    return {"concurrency": n, "adapters": k, "swapserve": median_summary(runs),
            "round_ratios": {den: r for den, r in ratios.items() if r}}


async def run_http_interference(cfg: BenchConfig, fx: Fixtures, server) -> dict:
    """The load-interference rounds again, through the real server (bench/http.py)."""
    from bench.http import HttpDriver

    driver = HttpDriver(server)
    try:
        await warm_up(driver, fx, cfg)
        streams = cell_requests(fx.prompts.take(cfg.interference_streams), list(fx.cell)[:4], cfg.max_tokens)
        intf = await interference(driver, streams, dict(list(fx.pool.items())[:cfg.interference_loads]),
                                  fx.prompts, cfg.http_interference_rounds)
        log.info("HTTP load interference: %+.0f%%", intf["itl_p99_rise"] * 100)
    finally:
        await driver.close()
    return intf


def traffic_spec(cfg: BenchConfig, fx: Fixtures, root: Path) -> TrafficSpec:
    """The traffic run's inputs: this run's model and cheap copies of a cell adapter (t00, t01, ...)."""
    t = cfg.traffic
    names = [f"t{i:02d}" for i in range(max(t.adapters, t.wide_requests))]
    made = copy_adapters(next(iter(fx.cell.values())), names, root / "traffic", cfg.seed)
    return TrafficSpec(str(fx.model_dir), {n: str(p) for n, p in made.items()}, str(root), asdict(t),
                       cfg.lora_rank, torch.get_num_threads(), cfg.dtype, cfg.device, cfg.quantization, cfg.seed,
                       commit=machine_git())


async def run_traffic_section(cfg: BenchConfig, fx: Fixtures, root: Path, anchors: Anchors | None) -> dict:
    """bench/traffic.py's workloads on this tree's engine, HF's static batches on (c)'s request set, and, with
    --traffic-baseline, the workloads again on that commit's engine (bench/baseline.py)."""
    spec = traffic_spec(cfg, fx, root)
    runs = [await run_traffic(spec)]
    out: dict = {"config": asdict(cfg.traffic), "runs": runs}
    if anchors:
        out["hf"] = hf_static(cfg, anchors)
    if cfg.traffic_baseline:
        rates = [r["rate"] for r in runs[0]["poisson"]["rates"]]
        try:
            runs.append(await run_baseline(cfg.traffic_baseline, spec, rates))
        except (RuntimeError, OSError, ValueError) as e:  # keep the rest of the run's results
            log.error("traffic baseline on %s failed: %s", cfg.traffic_baseline, e)
            out["baseline_error"] = f"{cfg.traffic_baseline}: {e}"
    return out


def hf_static(cfg: BenchConfig, anchors: Anchors) -> dict:
    """(c'): (c)'s request set through HF ``generate`` on the base model (oneDNN-packed linears where the server
    packs them), all there at time 0, static batches of max_num_seqs in arrival order."""
    t = cfg.traffic
    rs = RequestSet.long_tailed(t, cfg.seed)
    model, system = ((anchors.base_onednn, "base_onednn") if anchors.base_onednn is not None
                     else (anchors.base, "base"))
    prompts = rs.prompts(anchors.base.config.vocab_size, cfg.seed, "hf")
    out = summarize(anchors.static_batches(model, prompts, rs.output_lens, t.max_num_seqs))
    batches = [slice(i, i + t.max_num_seqs) for i in range(0, len(rs), t.max_num_seqs)]
    out.update(system=system, batch=t.max_num_seqs, req_s=len(rs) / out["seconds"],
               computed_tokens=sum(len(rs.prompt_lens[b]) * (max(rs.prompt_lens[b]) + max(rs.output_lens[b]))
                                   for b in batches))
    log.info("traffic (c') HF %s static batches: %.1f tok/s", system, out["tok_s"])
    return out


async def _measure(cfg, fx: Fixtures, anchors, engine, peft_load: list[float], clock: SectionClock,
                   server=None) -> dict:
    """The in-process sections; with ``server`` (and not --skip-http), the target cell over HTTP too, once per grid
    round right beside the in-process cell (before it in odd rounds, after it in even ones)."""
    from bench.http import HttpDriver
    from bench.timing import percentile_ms

    driver = EngineDriver(engine)
    http = HttpDriver(server) if server is not None and not cfg.skip_http else None
    target = target_cell(cfg)
    http_runs: list[dict] = []

    async def http_run(r: int, before: bool) -> None:
        if http is not None and bool(r % 2) == before:
            n, k = target
            http_runs.append(summarize(await run_concurrent(http, cell_requests(fx.prompts.take(n), list(fx.cell)[:k],
                                                                                cfg.max_tokens))))
            log.info("HTTP cell N=%d k=%d, round %d: %.1f tok/s", n, k, r + 1, http_runs[-1]["tok_s"])

    types = None
    if fx.typed:
        with clock.section("types"):  # their runs go in the grid's rounds, below
            types = TypesCells(cfg, engine, fx.typed, fx.kinds, list(fx.cell)[:4])
            await types.load(fx.prompts)
    try:
        with clock.section("grid"):
            await warm_up(driver, fx, cfg)
            if http is not None:
                await warm_up(http, fx, cfg)
            if anchors:
                anchors.warm_up(fx.prompts.take(1)[0])
            per_round: list[list[dict]] = []
            grid_loads = []
            for r in range(cfg.grid_rounds):  # every cell once per round, in turn: drifting load hits all alike
                load = {"start": loadavg()}
                base_rows: dict[int, dict] = {}  # N -> this round's HF base anchors at N
                per_round.append([])
                for n, k in progress.bar(cfg.cells, desc=f"bench cells, round {r + 1}/{cfg.grid_rounds}",
                                         unit="cell"):
                    if (n, k) == target:
                        await http_run(r, before=True)
                    row = await measure_cell(cfg, fx, anchors, driver, n, k, n not in base_rows, r == 0,
                                             base_rows.get(n), runs_adapters(cfg, r, (n, k), target),
                                             cfg.peft_naive_cells == "all" or (n, k) == target)
                    if (n, k) == target:
                        await http_run(r, before=False)
                    base_rows.setdefault(n, {key: row[key] for key in BASE_ANCHORS if key in row})
                    per_round[-1].append(row)
                if types is not None:  # the types cells, once per round, beside this round's anchors at their N
                    if types.n not in base_rows and anchors:
                        base_rows[types.n] = anchors.base_summaries(fx.prompts.take(types.n), cfg.max_tokens,
                                                                    stock=r == 0)
                    await types.run(fx.prompts, base_rows.get(types.n, {}))
                grid_loads.append(load | {"end": loadavg()})
                log.info("grid round %d/%d done (load average %s -> %s)", r + 1, cfg.grid_rounds, load["start"],
                         grid_loads[-1]["end"])
            cells = [combine_rounds(list(rows)) for rows in zip(*per_round)]
    finally:
        if http is not None:
            await http.close()
    with clock.section("swap"):  # swap costs and load interference
        pool = dict(list(fx.pool.items())[:cfg.swap_samples])
        swap = await swap_costs(engine, driver, pool, fx.on_demand, fx.prompts)
        swap["peft_load_adapter_p50_ms"] = percentile_ms(peft_load)
        log.info("swap costs: %s", {k: round(v, 2) for k, v in swap.items() if v is not None})
        streams = cell_requests(fx.prompts.take(cfg.interference_streams), list(fx.cell)[:4], cfg.max_tokens)
        loads = dict(list(fx.pool.items())[:cfg.interference_loads])
        intf = await interference(driver, streams, loads, fx.prompts, cfg.interference_rounds)
        log.info("load interference: %s", {k: round(v, 3) for k, v in intf.items() if k != "per_round"})
    out = {"cells": cells, "grid_loads": grid_loads, "swap": swap, "interference": intf}
    if http_runs:
        rows = [row for rows in per_round for row in rows if (row["concurrency"], row["adapters"]) == target]
        out["http"] = http_cell(http_runs, rows, *target)
    if cfg.structured_share:
        with clock.section("structured"):
            out["structured"] = await run_structured(cfg, engine, fx.cell, fx.prompts)
    if cfg.mixtures:
        with clock.section("mixtures"):
            out["mixtures"] = await run_mixtures(cfg, engine, fx.cell, fx.prompts)
    if types is not None:
        out["types"] = types_result(types)
    return out
