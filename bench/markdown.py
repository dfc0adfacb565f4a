"""BENCHMARKS.md, rendered from one results JSON (never edited by hand)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from bench.numbers import fixed as _f, megabytes as _mb, spread, times as _x
from bench.report import ratio
from bench.timing import median_range, section_summary
from bench.traffic_markdown import traffic_section
from bench.mixtures import mixtures_section
from bench.outside import outside_section
from bench.peers import peers_section
from bench.structured import structured_section


def _rel(path: Path | None, start: Path) -> str:
    return os.path.relpath(path, start) if path else ""


TARGET_CELL = (32, 16)  # the targets are set on 32 concurrent requests over 16 adapters


def pick_target(cells: list[tuple[int, int]]) -> tuple[int, int]:
    """The (N, k) the headline's targets are read on: 32 x 16 when the grid has it, else its largest cell (a GPU
    run's grid). The suite decides with it which cells repeat in later rounds; the report, which to quote."""
    return TARGET_CELL if TARGET_CELL in cells else max(cells)


def headline(results: dict) -> str:
    """The figures the targets are set on, each beside its target: first against the anchor that runs the same
    linears (HF ``generate`` with the linears packed for oneDNN as the server packs them), then against stock HF,
    then the peers. On the target cell when the run has it, else on its largest (a GPU run's grid)."""
    cells = results["cells"]
    n, k = pick_target([(c["concurrency"], c["adapters"]) for c in cells])
    top = next(c for c in cells if (c["concurrency"], c["adapters"]) == (n, k))
    lines = [f"**{n} concurrent requests over {k} distinct adapters:** swapserve {top['swapserve']['tok_s']:.1f} "
             "output tok/s."]
    if top.get("base_onednn"):
        m = results.get("machine") or {}
        spare = (not m.get("gpu") and m.get("torch_threads") and (m.get("cpus") or 0) > m["torch_threads"])
        lines.append(f"- **{cell_ratio(top, 'swapserve', 'base_onednn')} the base model at equal GEMM** (HF "
                     "`generate` on the same oneDNN-packed linears, what serving adapters costs at equal matmuls; "
                     "target >= 0.9x)" + ("; both run the same torch threads, and swapserve, with its defaults, "
                                          "runs its LoRA kernel on the CPU those leave free, beside the base GEMM "
                                          "(`--lora-overlap auto`; HF has no adapter math to put there)"
                                          if spare else ""))
    plain = next((c for c in cells if c["concurrency"] == n and c.get("no_adapter_round_ratios")), None)
    if plain:
        lines.append(f"- the base model with no adapter, {n} requests: "
                     f"{spread(median_range(plain['no_adapter_round_ratios']), '{:.2f}', 'x')} HF `generate` at "
                     "equal GEMM (the engine alone, no adapter math; target >= 1.0x)")
    lines.append(f"- {cell_ratio(top, 'swapserve', 'base')} stock HF `generate` on the base model (MKL sgemm "
                 "linears; target >= 0.8x)" + (f"; HF on the packed linears is itself {packed_over_stock(top)} "
                                                "stock HF" if top.get("base_onednn") else ""))
    pooled = pooled_naive(cells)
    naive = top["swapserve"]["tok_s"] / pooled["tok_s"] if pooled else ratio(top, "swapserve", "naive")
    lines.append(f"- {_x(naive)} the seed's naive serial flow (`set_adapter` + `generate` per request"
                 + ((f", pooled over all cells' {pooled['requests']} requests" if pooled["cells"] > 1 else
                     f", over its {pooled['requests']} requests") if pooled else "")
                 + f"; target >= 8x); PEFT's mixed batch runs at {_x(ratio(top, 'peft', 'base'))} stock HF")
    wide = next((c for c in cells if c["adapters"] == c["concurrency"] == 64 and c.get("swapserve_no_adapter")), None)
    traffic_wide = ((results.get("traffic") or {}).get("runs") or [{}])[0].get("wide")
    if wide:
        lines.append(f"- 64 requests over 64 adapters: {cell_ratio(wide, 'swapserve', 'swapserve_no_adapter')} the "
                     "same 64 requests on the base model, same engine (target >= 0.85x)")
    elif traffic_wide and traffic_wide["ratio"].get("median") is not None:  # the default grid stops at 16
        lines.append(f"- {traffic_wide['requests']} requests over {traffic_wide['adapters']} adapters: "
                     f"{spread(traffic_wide['ratio'], '{:.2f}', 'x')} the same requests on the base model, same "
                     "engine (the traffic section's (d); target >= 0.85x)")
    peers = results.get("peers")
    if peers:
        for row, target, what in (("adapters", ">= 3x", f"{peers['concurrency']} requests over {peers['adapters']} "
                                   "adapters"), ("base", ">= 1.0x", f"{peers['concurrency']} requests on the base model")):
            mr = peers["ratios"][row].get("llama-server f32")
            if mr and mr.get("median") is not None:
                lines.append(f"- **{_x(mr['median'])} llama.cpp's `llama-server`** (f32 GGUF of the same weights), "
                             f"{what} (rounds {_x(mr['min'])}–{_x(mr['max'])}; target {target})")
    http = results.get("http")
    same = next((c for c in cells if http and (c["concurrency"], c["adapters"]) ==
                 (http["concurrency"], http["adapters"])), None)
    if same:
        lines.append(f"- over HTTP: {http_ratio(http, same, 'swapserve')} the in-process engine (target >= 0.95x)")
    return "\n".join(lines)


def grid_rounds_text(results: dict) -> str:
    """Which grid systems ran in which rounds, read from the run itself (older runs and GPU runs ran stock HF in
    every round; runs with --grid-later-rounds target ran most cells' adapters in the first round only)."""
    cells = results["cells"]
    stock_once = any(len(c.get("base", {}).get("round_tok_s") or []) == 1 < c.get("rounds", 1) for c in cells)
    anchors = "HF base, oneDNN, which runs" if stock_once else "the HF base anchors, which run"
    with_peft = [(c["concurrency"], c["adapters"]) for c in cells if "peft" in c or "naive" in c]
    where = (f" of the {with_peft[0][0]} x {with_peft[0][1]} cell" if len(with_peft) == 1 < len(cells) else "")
    text = (f"PEFT mixed and naive serial run in the first round{where} only"
            + (", and so does stock HF base" if stock_once else "")
            + f"; {anchors} the same N prompts whatever k is, once per N per round (the first cell of that N), for "
            "every cell of that N")
    once = [c for c in cells if len(c.get("swapserve", {}).get("round_tok_s") or []) == 1 < c.get("rounds", 1)]
    if once:
        n, k = pick_target([(c["concurrency"], c["adapters"]) for c in cells])
        text += (f"; after the first round swapserve runs on adapters in the {n} x {k} cell only (its no-adapter "
                 "run still every round)")
    return text + (": a ratio measured in one round says so." if stock_once or once else ".")


def packed_over_stock(c: dict) -> str:
    """HF on the packed linears over stock HF in one cell: their first round's pair where stock HF ran in that
    round only, else the ratio of the two medians (both ran every round)."""
    stock, packed = (c.get(k, {}).get("round_tok_s") or [] for k in ("base", "base_onednn"))
    if len(stock) == 1 < len(packed):
        return f"{_x(packed[0] / stock[0])} (first round)"
    return _x(ratio(c, "base_onednn", "base"))


def http_ratio(http: dict, same: dict, den: str) -> str:
    """The HTTP cell over a system of the same in-process cell: where the HTTP cell ran beside the grid's rounds
    (``round_ratios``), the median (min–max) of each round's ratio to that round's run of the system; in runs
    before that, each HTTP run over that system's median; else the one ratio."""
    paired = (http.get("round_ratios") or {}).get(den)
    if paired:
        return spread(median_range(paired), "{:.2f}", "x") if len(paired) > 1 else f"{_x(paired[0])} (first round)"
    rounds, base = http["swapserve"].get("round_tok_s") or [], (same.get(den) or {}).get("tok_s")
    if len(rounds) > 1 and base:
        return spread(median_range([t / base for t in rounds]), "{:.2f}", "x")
    return _x(ratio({**same, "http": http["swapserve"]}, "http", den))


def cell_ratio(c: dict, num: str, den: str) -> str:
    """swapserve over an anchor in one grid cell: the median of the per-round ratios with their range when the
    anchor ran in several rounds, that round's own ratio when it ran in one (stock HF, the first round only),
    else the ratio of the two numbers (older results)."""
    rounds = (c.get("round_ratios") or {}).get(den) if num == "swapserve" else None
    if rounds and len(rounds) > 1:
        return spread(median_range(rounds), "{:.2f}", "x")
    if rounds and c.get("rounds", 1) > 1:
        return f"{_x(rounds[0])} (first round)"
    return _x(ratio(c, num, den))


def pooled_naive(cells: list[dict]) -> dict | None:
    """The naive serial flow's rate over every cell's requests (total tokens / total serving seconds)."""
    runs = [c["naive"] for c in cells if c.get("naive", {}).get("seconds")]
    if not runs:
        return None
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    return {"tok_s": tokens / seconds, "requests": sum(r["requests"] for r in runs), "cells": len(runs)}


def throughput_table(results: dict) -> list[str]:
    cells = results["cells"]
    onednn = has_packed(cells)  # older runs and GPU runs have no such anchor
    systems = ["base"] + ["base_onednn"] * onednn + ["swapserve", "swapserve_no_adapter", "peft", "naive"]
    heads = {"base": "HF base", "base_onednn": "HF base, oneDNN", "swapserve": "swapserve",
             "swapserve_no_adapter": "swapserve, no adapter", "peft": "PEFT mixed", "naive": "naive serial"}
    ratios = [("swapserve", "base", True)] + [("swapserve", "base_onednn", True)] * onednn + [
        ("swapserve", "naive", True), ("swapserve", "peft", False)]
    lines = ["| N | k | " + " | ".join(heads[s] for s in systems) + " | "
             + " | ".join(f"**{a} / {heads[b]}**" if bold else f"{a} / {heads[b]}" for a, b, bold in ratios) + " |",
             "|---:|---:|" + "---:|" * (len(systems) + len(ratios))]
    for c in cells:
        tok = [_f(c[k]["tok_s"] if k in c else None) for k in systems]
        rel = [f"**{cell_ratio(c, a, b)}**" if bold else cell_ratio(c, a, b) for a, b, bold in ratios]
        lines.append(f"| {c['concurrency']} | {c['adapters']} | " + " | ".join(tok + rel) + " |")
    return lines


def latency_table(results: dict) -> list[str]:
    lines = ["| N | k | system | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |", "|---:|---:|---|---:|---:|---:|---:|"]
    names = {"swapserve": "swapserve", "base": "HF base", "base_onednn": "HF base, oneDNN", "peft": "PEFT mixed",
             "naive": "naive serial"}
    for c in results["cells"]:
        for key, label in names.items():
            s = c.get(key)
            if s:
                lines.append(f"| {c['concurrency']} | {c['adapters']} | {label} | {_f(s['ttft_p50_ms'])} | "
                             f"{_f(s['ttft_p99_ms'])} | {_f(s['itl_p50_ms'])} | {_f(s['itl_p99_ms'])} |")
    return lines


def swap_table(results: dict) -> list[str]:
    s, i = results["swap"], results["interference"]
    return [
        "| adapter swap step | time | target |", "|---|---:|---:|",
        f"| cold load, local safetensors -> host (AdapterStore, p50 of {s['samples']}, "
        f"{s['adapter_mb']:.1f} MB) | {_f(s['cold_load_p50_ms'])} ms | <= 100 ms |",
        f"| host -> device slot (AdapterManager.activate, evicting the LRU slot, p50) | "
        f"{_f(s['activate_p50_ms'], '{:.2f}')} ms | <= 10 ms |",
        f"| PEFT `load_adapter` (read + inject modules, p50) | {_f(s.get('peft_load_adapter_p50_ms'))} ms | – |",
        f"| first request on an on-disk adapter: TTFT p50 (on-demand resolve + load + activate) | "
        f"{_f(s['first_ttft_p50_ms'])} ms | – |",
        f"| next request on the same adapter: TTFT p50 | {_f(s['warm_ttft_p50_ms'])} ms | – |",
        f"| ITL p99 of {i['streams']} streams{_steady(i)}, quiet -> while {i['loads']} adapters cold-load "
        f"({i['loads_seconds']:.2f} s){_rounds(i)} | {_f(i['quiet_itl_p99_ms'])} -> {_f(i['loading_itl_p99_ms'])} ms "
        f"({i['itl_p99_rise'] * 100:+.0f}%) | <= +20% |",
    ]


def _steady(i: dict) -> str:
    """Which gaps the interference p99 counts: runs since the steady-state measure say so (bench/swap.py)."""
    return " (the gaps once all are decoding)" if i.get("steady") else ""


def _rounds(i: dict) -> str:
    """", median of 3 rounds (+4%, +19%, +9%)" for runs that repeat the measurement; "" for older ones."""
    rows = i.get("per_round")
    if not rows or len(rows) < 2:
        return ""
    rises = ", ".join(f"{r['loading_itl_p99_ms'] / r['quiet_itl_p99_ms'] * 100 - 100:+.0f}%" for r in rows)
    return f"; medians of {len(rows)} rounds ({rises})"


def _setting(cfg: dict) -> str:
    """"fp32, CPU" / "bfloat16 + nf4, CUDA": dtype, quantization and device of every system in the run."""
    dtype = {"float32": "fp32"}.get(cfg.get("dtype", "float32"), cfg.get("dtype"))
    quant = cfg.get("quantization", "none")
    return f"{dtype}{'' if quant == 'none' else ' + ' + quant}, {cfg.get('device', 'cpu').upper()}"


def machine_lines(results: dict) -> list[str]:
    m = results["machine"]
    gpu = f"{m['gpu']}, " if m.get("gpu") else ""
    isa = f" ({m['cpu_capability']})" if m.get("cpu_capability") else ""
    return [f"- **Machine:** {gpu}{m['cpu']}{isa}, {m['cpus']} CPUs, {m['memory_gb']} GB RAM; torch {m['torch']} "
            f"({m['torch_threads']} intra-op thread{'s' if m['torch_threads'] != 1 else ''}), Python {m['python']}",
            f"- **Date:** {results['date']} (wall time {results['wall_seconds']:.0f} s); load average at start "
            f"{results['load_start']}, at end {results['load_end']} (the machine is shared)"
            + _grid_loads(results.get("grid_loads")) + _probe(results.get("cpu_gflops")),
            *_time_line(results),
            f"- **Command:** `{results['command']}`; commit {m['git'] or '?'}{' (dirty tree)' if m['git_dirty'] else ''}",
            f"- **Model:** {results['model']}, {_setting(results['config'])}; adapters: PEFT LoRA "
            f"r{results['config']['lora_rank']} "
            f"on all 7 linear modules, random small weights, made at bench time; greedy, "
            f"{results['config']['prompt_tokens']}-token prompts, exactly {results['config']['max_tokens']} "
            "output tokens per request"]


def _probe(probe: dict | None) -> str:
    """"; one thread's fp32 GEMM per CPU at start -> end: 66 / 65 -> 64 / 58 GFLOP/s" (bench.report.cpu_probe;
    older runs have none: nothing)."""
    if not probe or not probe.get("start"):
        return ""
    each = [" / ".join(f"{g:.0f}" for g in probe[key]) for key in ("start", "end") if probe.get(key)]
    return ("; one thread's fp32 GEMM (512-square) on each CPU at start -> end: " + " -> ".join(each)
            + " GFLOP/s (a slow hour reads lower)")


def _time_line(results: dict) -> list[str]:
    """"- **Time by section** (minutes): 12.9 min: memory 0.5, grid 2.4, ..." from the run's section clock
    (older runs have none: no line)."""
    seconds = results.get("section_seconds")
    if not seconds:
        return []
    peers = results.get("peers") or {}
    prepare = peers.get("prepare_seconds")
    cpu = results.get("section_cpu_seconds")
    return [f"- **Time by section** (minutes): {section_summary(seconds, results.get('wall_seconds'))}"
            + (f"; CPU time in those sections {sum(cpu.values()) / 60:.1f} min (this process and the servers, "
               "converters and clients it started: well below the wall time when other jobs held the CPUs)"
               if cpu else "")
            + (f"; peers includes {prepare / 60:.1f} min preparing llama-server and its GGUF files (built and "
               "converted the first time, cached after)" if prepare and prepare >= 30 else "")]


def _grid_loads(loads: list[dict] | None) -> str:
    """"; the grid ran 3 rounds (load average at each round's start -> end: 1.0 -> 1.1, ...)"."""
    if not loads:
        return ""
    return (f"; the throughput grid ran {len(loads)} round{'s' if len(loads) != 1 else ''}, every cell once per "
            "round in turn (1-minute load average at each round's start -> end: "
            + ", ".join(f"{l['start'].split()[0]} -> {l['end'].split()[0]}" for l in loads) + ")")


def render(results: dict, json_path: Path, png_path: Path | None, md_path: Path) -> str:
    """md_path: where the markdown will live (links are relative to it)."""
    cfg, here = results["config"], Path(md_path).resolve().parent
    src = os.path.relpath(json_path, Path.cwd())
    dirty = results["machine"].get("git_dirty")
    out = ["# swapserve benchmarks", "",
           *(["> **Made from a tree with uncommitted changes** (`--allow-dirty`): these numbers belong to no "
              "commit. Regenerate from a clean tree before quoting them.", ""] if dirty else []),
           f"Generated by `bench/` from [`{_rel(json_path, here)}`]({_rel(json_path, here)}); regenerate with "
           f"`make bench` (or `python -m bench.report {src}`). Do not edit by hand.", "",
           *machine_lines(results), "", headline(results), "",
           "## Throughput (output tokens/s, all N requests sent at once)", "",
           "N = concurrent requests, k = distinct adapters (request i uses adapter i mod k). *HF base*: "
           "`generate` on the plain base model, batch N (stock torch: its CPU linears are MKL's sgemm). *HF base, "
           "oneDNN*: the same `generate` with the linears packed for oneDNN as swapserve's `--cpu-gemm` does "
           "(the ceiling for adapter serving at swapserve's GEMM). *PEFT mixed*: one `generate` with "
           "`adapter_names=`. *Naive serial*: the seed's flow, `set_adapter` + `generate` one request at a time "
           f"(measured on the first min(N, {cfg['naive_requests']}) requests; it does not batch, so its tok/s "
           "does not grow with N). *swapserve*: the in-process `AsyncEngine`, N concurrent streams (the same cell "
           "through the HTTP server: its own section below). With rounds (the machine line says how many), every "
           "number is the median over the rounds and swapserve's ratios are medians of per-round ratios (min–max); "
           + grid_rounds_text(results), "",
           *throughput_table(results), ""]
    if png_path:
        out += [f"![throughput vs distinct adapters]({_rel(png_path, here)})", ""]
    out += ["## Latency (ms; TTFT from send, ITL per token, from the client-side stream timestamps)", "",
            "HF/PEFT rows share one `generate` call, so every row sees the same step times. Naive TTFT is "
            "projected for N requests queued at once (request i waits for the i before it, each taking the "
            "measured per-request time).", "", *latency_table(results), "",
            "## Adapter swap cost", "", *swap_table(results), "",
            "\"Disk\" is the OS page cache (the adapters were just written); a cold disk adds its read time.", "",
            *http_section(results), *peers_section(results), *outside_section(results),
            *scale_section(results), *types_section(results), *structured_section(results),
            *mixtures_section(results),
            *memory_section(results), *traffic_section(results), *gpu_section(Path(json_path).parent, here)]
    return "\n".join(out)


def gpu_section(results_dir: Path, here: Path) -> list[str]:
    """One throughput table per bench/results/gpu-*.json (written by bench/gpu.sh on a lent GPU machine)."""
    runs = sorted(Path(results_dir).glob("gpu-*.json"))
    if not runs:
        return []
    lines = ["## GPU", "", "`bench/gpu.sh run` on a GPU machine (random weights built from each model's config; "
             "same harness and columns as the throughput table above). Each run is its own process, so compare "
             "ratios within a table.", ""]
    for path in runs:
        results = json.loads(path.read_text())
        m = results["machine"]
        lines += [f"### {results['model']}, {_setting(results['config'])}", "",
                  f"{m.get('gpu') or m['cpu']}; torch {m['torch']}; {results['date']}; commit {m['git'] or '?'}; "
                  f"[`{_rel(path, here)}`]({_rel(path, here)}); {results['config']['max_tokens']} output tokens", "",
                  *throughput_table(results), ""]
    return lines


def scale_section(results: dict) -> list[str]:
    sc = results.get("scale")
    if not sc:
        return []
    onednn = has_packed(sc["rounds"])
    head = vs_base_head(onednn)
    lines = ["## Scale: many adapters on disk, Zipf traffic, loaded on demand", "",
             f"{sc['adapters']} LoRA r{sc['rank']} adapters (all 7 linear modules; one PEFT save, then copies with "
             "per-tensor scaled weights) registered on disk under an `--adapter-root` and never pre-loaded; "
             f"swapserve with `max_cpu_loras={sc['max_cpu_loras']}` (host tier) and `max_loras={sc['max_loras']}` "
             f"(device slots); {sc['requests']} requests sent at once, each naming an adapter drawn "
             f"Zipf(s={sc['zipf_s']}) over all {sc['adapters']}. Round 1 starts with empty tiers"
             + ("; round 2 draws again on the tiers round 1 left" if len(sc["rounds"]) > 1 else
                " (this run has only it; `--scale-rounds 2` draws again on the tiers it left)")
             + ". *Host hit rate*: requests whose adapter was already in host memory "
             "when admitted (a request arriving while its adapter is still loading counts as a miss, so round 1, "
             "where all requests arrive at once onto empty tiers, is 0% by construction; *host loads* counts the "
             "disk reads). *Device loads*: host -> device slot copies (`runner.manager.loads`). Anchor: HF "
             f"`generate` on the base model, batch {sc['requests']}, on the oneDNN-packed linears the server uses "
             "(equal GEMM) and stock.", "",
             f"| round | distinct adapters | {head} | host hit rate | host loads | host evictions | device loads |",
             "|---:|---:|" + "---:|" * (_columns(head) + 4)]
    for r in sc["rounds"]:
        lines.append(f"| {r['round']} | {r['distinct_adapters']} | {_stats_vs_base(r, onednn)} | "
                     f"{r['host_hit_rate'] * 100:.0f}% ({r['host_hits']}/{r['host_hits'] + r['host_misses']}) | "
                     f"{r['host_loads']} | {r['host_evictions']} | {r['device_loads']} |")
    lines += ["", "Latency in ms (TTFT from send, ITL per token). HF base TTFT/ITL for the same batch: " + "; ".join(
        f"round {r['round']}: TTFT p50 {_f(r['base']['ttft_p50_ms'])}, ITL p50 {_f(r['base']['itl_p50_ms'])}"
        for r in sc["rounds"] if r.get("base")) + ".", ""]
    return lines


def http_section(results: dict) -> list[str]:
    h = results.get("http")
    if not h:
        return []
    same = next((c for c in results["cells"] if (c["concurrency"], c["adapters"]) == (h["concurrency"], h["adapters"])),
                {})
    s, i = h["swapserve"], h["interference"]
    packed = has_packed([same])
    return ["## Through the HTTP server", "",
            "The same engine settings served by `python -m server serve`, a child of the benchmark on a loopback "
            "port, driven as vLLM's benchmark_serving drives a server: SSE from `/v1/completions` with "
            "`ignore_eos` (each chunk one token for the gaps, the final usage for the count), adapters loaded "
            "with `/v1/load_lora_adapter`. What a client sees: HTTP, JSON, SSE and the event loop included. "
            + (f"The cell ran once in each of the grid's {len(s['round_tok_s'])} rounds, right beside the "
               "in-process cell (before it in odd rounds, after it in even ones): tok/s and latencies are medians, "
               "each ratio the median (min–max) of the rounds' own ratios." if h.get("round_ratios") and
               len(s.get("round_tok_s") or []) > 1 else
               f"The cell ran {len(s['round_tok_s'])} times in a row: tok/s and latencies are medians, the "
               "ratios the median (min–max) of each run over the in-process cell's median."
               if len(s.get("round_tok_s") or []) > 1 else ""), "",
            "| N | k | swapserve in-process tok/s | **over HTTP tok/s** | HTTP / in-process | "
            + ("**HTTP / HF base, oneDNN** | HTTP / HF base" if packed else "**HTTP / HF base**")
            + " | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |", "|---:|---:|" + "---:|" * (9 if packed else 8),
            f"| {h['concurrency']} | {h['adapters']} | {_f(same.get('swapserve', {}).get('tok_s'))} | "
            f"**{_f(s['tok_s'])}** | {http_ratio(h, same, 'swapserve')} | "
            + (f"**{http_ratio(h, same, 'base_onednn')}** | {http_ratio(h, same, 'base')}" if packed
               else f"**{http_ratio(h, same, 'base')}**")
            + f" | {_f(s['ttft_p50_ms'])} | {_f(s['ttft_p99_ms'])} | "
            f"{_f(s['itl_p50_ms'])} | {_f(s['itl_p99_ms'])} |", "",
            f"ITL p99 of {i['streams']} streams over HTTP{_steady(i)}, quiet -> while {i['loads']} adapters load through "
            f"`/v1/load_lora_adapter` ({i['loads_seconds']:.2f} s){_rounds(i)}: {_f(i['quiet_itl_p99_ms'])} -> "
            f"{_f(i['loading_itl_p99_ms'])} ms (**{i['itl_p99_rise'] * 100:+.0f}%**; target <= +20%).", ""]


def has_packed(rows: list[dict]) -> bool:
    """Whether any row has the equal-GEMM anchor (CPU runs since it exists; never a GPU run): its columns show."""
    return any("base_onednn" in r for r in rows)


def vs_base_head(onednn: bool) -> str:
    """The header cells of a table setting swapserve beside the HF anchors: equal GEMM first where the run has
    that anchor, then stock HF, then swapserve's latencies."""
    if onednn:
        return ("HF base, oneDNN tok/s | HF base tok/s | swapserve tok/s | **swapserve / HF base, oneDNN** | "
                "swapserve / HF base | TTFT p50 | TTFT p99 | ITL p50 | ITL p99")
    return "HF base tok/s | swapserve tok/s | **swapserve / HF base** | TTFT p50 | TTFT p99 | ITL p50 | ITL p99"


def _columns(head: str) -> int:
    return head.count("|") + 1


def _stats_vs_base(row: dict, onednn: bool) -> str:
    """The cells under vs_base_head: the anchors' tok/s, swapserve's, its ratio to each (equal GEMM first;
    "–" where this row had no such anchor; over rounds, the median (min–max) of each round's ratio), its
    latencies."""
    s = row["swapserve"]
    packed = (f"{_f(row.get('base_onednn', {}).get('tok_s'))} | " if onednn else "")
    ratios = (f"**{cell_ratio(row, 'swapserve', 'base_onednn')}** | {cell_ratio(row, 'swapserve', 'base')}" if onednn
              else f"**{cell_ratio(row, 'swapserve', 'base')}**")
    return (f"{packed}{_f(row.get('base', {}).get('tok_s'))} | {_f(s['tok_s'])} | {ratios} | "
            f"{_f(s['ttft_p50_ms'])} | {_f(s['ttft_p99_ms'])} | {_f(s['itl_p50_ms'])} | {_f(s['itl_p99_ms'])}")


def types_section(results: dict) -> list[str]:
    ty = results.get("types")
    if not ty:
        return []
    onednn = has_packed(ty["cells"])
    head = vs_base_head(onednn)
    rounds = max(c.get("rounds", 1) for c in ty["cells"])
    lines = ["## Adapter types: IA3 and a mixed batch", "",
             "Same engine as the throughput grid; r16 LoRA / DoRA / AdaLoRA (init_r 16) and IA3 on all 7 linear "
             "modules (IA3 scales `down_proj`'s input, the others' outputs). *mixed*: LoRA, DoRA, IA3 and "
             "AdaLoRA adapters round-robin in one batch. No PEFT row: PEFT's `adapter_names` mixed batch works "
             "only across LoRA adapters, and a PeftModel cannot hold LoRA and IA3 adapters and mix them in one "
             "batch, so its only way to serve these is the naive serial flow. Anchors: HF `generate` on N prompts "
             "of the same lengths" + (", on the oneDNN-packed linears (equal GEMM) and stock" if onednn else "")
             + (f". Each cell ran once in each of the grid's {rounds} rounds, after that round's cells, beside that "
                "round's anchors at its N (the grid's, where it has that N): tok/s and latencies are medians over "
                "the rounds, each ratio the median (min–max) of the rounds' own ratios (one measured in one round "
                "says so)." if rounds > 1 else
                " (the throughput grid's, measured minutes earlier, where it has that N)."), "",
             f"| cell | N | adapters | {head} |", "|---|---:|---|" + "---:|" * _columns(head)]
    for c in ty["cells"]:
        kinds = " + ".join(f"{v} {k}" for k, v in c["kinds"].items())
        lines.append(f"| {c['cell']} | {c['concurrency']} | {kinds} | {_stats_vs_base(c, onednn)} |")
    return lines + [""]


def memory_section(results: dict) -> list[str]:
    mem = results.get("memory")
    if not mem:
        return []
    lines = ["## Memory", "",
             "Base model resident set, one fresh subprocess per quantization (`python -m bench.memory`): "
             "`server.engine.loader.load_model`, then its float32 linears packed for oneDNN as the server does "
             "(`--cpu-gemm auto`; bitsandbytes layers stay as they are), one 8-token forward "
             "(so the mmapped weight pages a server touches count), gc + `malloc_trim`. *Model RSS* = RSS after loading minus RSS after importing "
             "torch/transformers/bitsandbytes (that floor is the same in every row). *Weights*: "
             "`loader.parameter_bytes` (packed bytes for int8/nf4). Sizes in MB (10^6 bytes).", "",
             "| base model | weights | model RSS | RSS total | of which anonymous | of which file-backed | peak RSS "
             "(VmHWM) | load s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in mem["models"]:
        if "error" in m:
            lines.append(f"| {m['quantization']} | failed: {' '.join(m['error'])} | | | | | | |")
            continue
        lines.append(f"| {'plain fp32' if m['quantization'] == 'none' else m['quantization']} | "
                     f"{_mb(m['parameter_bytes'])} | **{_mb(m['model_rss'])}** | {_mb(m['rss_loaded'])} | "
                     f"{_mb(m.get('rss_anon'))} | {_mb(m.get('rss_file'))} | {_mb(m['peak_rss'])} | "
                     f"{m['load_seconds']:.1f} |")
    tiers = mem.get("adapter")
    host = (results.get("types") or {}).get("host_bytes", {})
    if tiers:
        lines += ["", f"Bytes per adapter per tier (LoRA r{tiers['rank']}, all 7 linear modules, fp32):", "",
                  "| tier | bytes per adapter | what |", "|---|---:|---|",
                  f"| disk | {_mb(tiers['disk_bytes'])} MB | `adapter_model.safetensors` |",
                  f"| host | {_mb(tiers['host_bytes'])} MB | `AdapterWeights.nbytes` (A, B as loaded) |",
                  f"| device | {_mb(tiers['device_slot_bytes'])} MB | `runner.slot_bytes / max_loras` "
                  f"({_mb(tiers['device_total_bytes'])} MB preallocated for {tiers['max_loras']} slots at "
                  "`--max-lora-rank`, whatever the adapter's own rank or type) |"]
        if host:
            lines += ["", "Host bytes by adapter type (r16 / IA3 on the same modules): " + ", ".join(
                f"{k} {_mb(v)} MB" for k, v in host.items()) + "."]
    return lines + [""]
