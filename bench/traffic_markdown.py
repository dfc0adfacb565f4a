"""BENCHMARKS.md's "Real traffic" section, from results["traffic"] (bench/suite.py's run_traffic_section):
``runs`` (this tree's engine first, then a --traffic-baseline commit's), ``hf`` (HF's static batches on (c)'s
request set) and ``config`` (the TrafficConfig)."""
from __future__ import annotations

from bench.numbers import fixed, megabytes, spread, times

STATS = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def engine_name(run: dict) -> str:
    """"engine v2 (6bc0125)": v2 has the paged KV pool, v1 the dense per-row buffer."""
    version = "engine v2" if run["engine"].get("paged") else "engine v1"
    return f"{version} ({run['commit']})" if run.get("commit") else version


def _arrow(run: dict, key: str, fmt: str = "{:.0f}") -> str:
    """"A -> B" of one (a) statistic, medians over the rounds."""
    a, b = run["long_one"][f"{key}_A"], run["long_one"][f"{key}_B"]
    return f"{fixed(a['median'], fmt)} → {fixed(b['median'], fmt)}"


def engines_table(runs: list[dict]) -> list[str]:
    lines = ["| engine | torch threads | (a)–(c) engine: max_num_seqs / max_loras / max_model_len | token budget per "
             "step | KV cache | (d) engine | load average, start → end |", "|---|---:|---|---|---|---|---|"]
    for run in runs:
        e, w = run["engine"], run["wide_engine"]
        kv = (f"paged pool {megabytes(e['kv_bytes'])} MB, block {e.get('block_size')}, prefix caching "
              f"{'on' if e.get('enable_prefix_caching') else 'off'}" if e.get("paged") else
              "dense rows × columns, grown by doubling up to max_num_seqs × max_model_len; no prefix cache")
        budget = (f"{e['token_budget']} tokens computed (prefill chunked)" if e.get("paged") else
                  f"{e['token_budget']} prompt tokens admitted (padded prefill, not chunked)")
        lines.append(f"| {engine_name(run)} | {run['threads']} | {e['max_num_seqs']} / {e['max_loras']} / "
                     f"{e['max_model_len']} | {budget} | {kv} | {w['max_num_seqs']} seqs / {w['max_loras']} loras, "
                     f"budget {w['token_budget']} | {run['load_start']} → {run['load_end']} |")
    return lines


def long_one_table(runs: list[dict]) -> list[str]:
    lines = ["| engine | wall A, s | wall B, s | **B / A** (target ≤ 1.3) | the long prompt alone (L), s | bound "
             "(A + L) / A | B / (A + L) | short TTFT p50 A → B, ms | short ITL p50 A → B, ms | short ITL p99 A → B, "
             "ms | the long prompt's TTFT, ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        a = run["long_one"]
        bound = [spread(a[k], *fmt) if k in a else "–" for k, fmt in
                 (("wall_L_s", ()), ("bound", ("{:.2f}", "x")), ("over_bound", ("{:.2f}", "x")))]
        lines.append(f"| {engine_name(run)} | {spread(a['wall_A_s'])} | {spread(a['wall_B_s'])} | "
                     f"**{spread(a['ratio'], '{:.2f}', 'x')}** | {' | '.join(bound)} | "
                     f"{_arrow(run, 'short_ttft_p50_ms')} | "
                     f"{_arrow(run, 'short_itl_p50_ms')} | {_arrow(run, 'short_itl_p99_ms')} | "
                     f"{spread(a['long_ttft_ms'], '{:.0f}')} |")
    return lines


def prefix_table(runs: list[dict]) -> list[str]:
    lines = ["| engine | request 1 TTFT, ms | request 2 TTFT, ms | **2 / 1** (target ≤ 0.3) | prompt tokens served "
             "from the prefix cache, request 1 / 2 |", "|---|---:|---:|---:|---:|"]
    for run in runs:
        p = run["prefix"]
        cached = (f"{spread(p['cached_first'], '{:.0f}')} / {spread(p['cached_second'], '{:.0f}')}"
                  if p["cached_second"]["n"] else "– (no prefix cache)")
        lines.append(f"| {engine_name(run)} | {spread(p['ttft_first_ms'], '{:.0f}')} | "
                     f"{spread(p['ttft_second_ms'], '{:.0f}')} | **{spread(p['ratio'], '{:.2f}', 'x')}** | {cached} |")
    return lines


def _count(value) -> str:
    return "–" if value is None else str(value)


def poisson_table(runs: list[dict], slo: str) -> list[str]:
    lines = ["| engine | offered req/s (load) | output tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | "
             f"**goodput** ({slo}) | KV in use, peak MB | KV held, MB | peak running / waiting | preemptions | "
             "prefix hits / lookups (tokens) |", "|---|" + "---:|" * 13]
    for run in runs:
        for r in run["poisson"]["rates"]:
            g = r["goodput"]
            hits = "–" if r["prefix_hits"] is None else f"{r['prefix_hits']} / {r['prefix_queries']}"
            lines.append(f"| {engine_name(run)} | {r['rate']:.3f} ({r['load']:.2f}x) | {fixed(r['tok_s'])} | "
                         f"{r['req_s']:.3f} | " + " | ".join(fixed(r[k], '{:.0f}') for k in STATS) + " | "
                         f"**{100 * g['share']:.0f}%** ({g['good']}/{g['of']}) | "
                         f"{megabytes(r['peak_kv_used_bytes'])} | "
                         f"{megabytes(r['peak_kv_held_bytes'])} | {r['peak_running']} / {r['peak_waiting']} | "
                         f"{_count(r['preemptions'])} | {hits} |")
    return lines


def anchor_table(runs: list[dict], hf: dict | None) -> list[str]:
    """(c'): the base model, all requests at time 0: swapserve's engines beside HF's static batches."""
    lines = ["| system | output tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | **/ HF** |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows = [(f"swapserve {engine_name(run)}, base model, continuous batching", run["poisson"]["base_all_at_once"])
            for run in runs]
    if hf:
        gemm = ", oneDNN-packed linears (equal GEMM)" if hf["system"] == "base_onednn" else ""
        rows.append((f"HF `generate`{gemm}, static batches of {hf['batch']} (left-padded)", hf))
    for label, s in rows:
        rel = times(s["tok_s"] / hf["tok_s"]) if hf else "–"
        lines.append(f"| {label} | {fixed(s['tok_s'])} | {s['req_s']:.3f} | " +
                     " | ".join(fixed(s[k], '{:.0f}') for k in STATS) + f" | **{rel}** |")
    return lines


def targets_table(runs: list[dict], hf: dict | None) -> list[str]:
    """Issue 15's targets, one column per engine (medians over rounds)."""
    def anchor(run):
        return times(run["poisson"]["base_all_at_once"]["tok_s"] / hf["tok_s"]) if hf else "–"

    def long_one(run):
        a = run["long_one"]
        bound = f" (bound {times(a['bound']['median'])})" if "bound" in a else ""
        return times(a["ratio"]["median"]) + bound

    rows = [("(a) wall time, one long prompt among short ones / all short (the bound: all short + the long "
             "prompt alone)", "≤ 1.3x", long_one),
            ("(b) TTFT of the second request on a shared prefix / the first's", "≤ 0.3x",
             lambda r: times(r["prefix"]["ratio"]["median"])),
            ("(c') base model, continuous batching / HF static batches" + (" at equal GEMM" if hf and
             hf["system"] == "base_onednn" else ""), "> 1.0x", anchor),
            (f"(d) {runs[0]['wide']['adapters']} adapters / base model, throughput", "≥ 0.85x",
             lambda r: times(r["wide"]["ratio"]["median"]))]
    lines = ["| target (issue 15) | | " + " | ".join(engine_name(r) for r in runs) + " |",
             "|---|---:|" + "---:|" * len(runs)]
    for label, target, value in rows:
        lines.append(f"| {label} | {target} | " + " | ".join(f"**{value(r)}**" for r in runs) + " |")
    return lines


def wide_table(runs: list[dict]) -> list[str]:
    lines = ["| engine | requests | adapters tok/s | base tok/s | **adapters / base** (target ≥ 0.85) |",
             "|---|---:|---:|---:|---:|"]
    for run in runs:
        d = run["wide"]
        lines.append(f"| {engine_name(run)} | {d['requests']} | {spread(d['adapters_tok_s'])} | "
                     f"{spread(d['base_tok_s'])} | **{spread(d['ratio'], '{:.2f}', 'x')}** |")
    return lines


def _lora(run: dict) -> str:
    return f"LoRA r{run['engine']['max_lora_rank']} on all 7 linear modules, scaled copies of one PEFT save"


def _lengths(name: str, cfg: dict, drawn: dict) -> str:
    return (f"{name} lengths lognormal(median {cfg[name + '_median']:g}, σ {cfg[name + '_sigma']:g}) clipped to "
            f"[{cfg[name + '_min']}, {cfg[name + '_max']}] (drawn: mean {drawn['mean']:.0f}, p50 {drawn['p50']:.0f}, "
            f"p90 {drawn['p90']:.0f}, max {drawn['max']}; {drawn['total']} in all)")


def poisson_intro(runs: list[dict], cfg: dict) -> str:
    first = runs[0]["poisson"]
    drawn = first["set"]
    adapters = runs[0]["long_one"]["adapters"]
    rates = (f"at {', '.join(f'{x:g}' for x in cfg['loads'])} × the capacity {engine_name(runs[0])} measured on "
             f"the base model with every request sent at once ({first['capacity_req_s']:.3f} req/s)"
             if not cfg["rates"] else f"at {', '.join(f'{x:g}' for x in cfg['rates'])} req/s (given)")
    return (f"One fixed request set of {drawn['requests']} requests: {_lengths('prompt', cfg, drawn['prompt'])}; "
            f"{_lengths('output', cfg, drawn['output'])}. The lengths are each distribution's quantiles at "
            f"(i + ½) / {drawn['requests']} (a stratified draw, so the tail is there however few the requests), "
            f"prompts and outputs each in a seeded random order. Request i is on adapter i mod {adapters} "
            f"({_lora(runs[0]) if adapters else 'the base model'}), with fresh random prompt tokens in "
            f"every run. Poisson arrivals (one draw of unit-rate gaps, scaled per rate; open loop: TTFT counts from "
            f"the scheduled send) {rates}; every engine runs at the same rates (*load*: the rate over that engine's "
            f"own capacity). *Goodput*: the share of requests with "
            f"TTFT ≤ {cfg['slo_ttft_s']:g} s and mean ITL ≤ {cfg['slo_itl_s'] * 1e3:g} ms. *KV in use*: the peak, "
            f"polled every {cfg['poll_s'] * 1e3:g} ms, of the KV bytes held by running sequences (v2: blocks held × "
            "block bytes; v1: live tokens × bytes per token); *KV held*: the cache itself (v2: the pool allocated at "
            "start; v1: its buffer as grown). Latencies in ms.")


def traffic_section(results: dict) -> list[str]:
    tr = results.get("traffic")
    if not tr:
        return []
    runs, cfg = tr["runs"], tr["config"]
    a, b, d = runs[0]["long_one"], runs[0]["prefix"], runs[0]["wide"]
    rounds = f"medians over {cfg['rounds']} rounds, min–max in brackets" if cfg["rounds"] > 1 else "one round"
    error = tr.get("baseline_error")
    failed = f" The baseline run failed ({error}); see the run's log." if error else ""
    order = ("runs in this process" if len(runs) == 1 else
             f"{engine_name(runs[0])} runs in this process, then {engine_name(runs[1])} in a subprocess on that "
             "commit's `server/` (`git archive`) with this tree's `bench/`: the same model, adapters, sizes, "
             "threads and rates, one after the other (not interleaved)")
    return ["## Real traffic", "",
            "Issue 15's workloads (`bench/traffic.py`), each through the in-process `AsyncEngine`: greedy, "
            "`ignore_eos`, a fixed output length per request, TTFT and ITL from the stream's timestamps. Prompts are "
            "random token ids, fresh for every cell run, so nothing hits the prefix cache unless the workload "
            f"means it to. The machine and model of the header ({results.get('model', '?')}); {order}. Each "
            "engine keeps its own defaults for "
            f"everything not listed.{failed}", "", *targets_table(runs, tr.get("hf")), "", *engines_table(runs), "",
            f"### (a) One long prompt among short ones", "",
            f"{a['requests']} requests × {a['max_tokens']} output tokens sent together, request i on adapter "
            f"i mod {a['adapters']}. A: every prompt {a['short_prompt']} tokens. B: the same, but request 0 (sent "
            f"first) has a {a['long_prompt']}-token prompt. L: the long prompt alone, one output token (its "
            f"prefill" + (", the same work every round: measured in the first round only). Rounds interleave A, B, "
                          "A, B" if a.get("l_rounds") == 1 else "). Rounds interleave A, B, L, A, B, L")
            + f"; {rounds}. *Short*: requests 1.. in both cells. The "
            "bound: on cores A already keeps busy, B can not take less than A + L (the same work plus the long "
            "prompt's), so (A + L) / A is the least B / A any scheduler reaches here and B / (A + L) is what the "
            "engine adds to it; the target ≤ 1.3x assumed L ≈ 0.3 A.", "", *long_one_table(runs), "",
            "### (b) Shared prefix", "",
            f"Base model: a {b['prefix_tokens']}-token prefix + a {b['tail_tokens']}-token tail, {b['max_tokens']} "
            "output tokens; request 1, and once it finished, request 2 with the same prefix and another tail; a "
            f"fresh prefix each round; {rounds}.", "", *prefix_table(runs), "",
            "### (c) Long-tailed lengths, Poisson arrivals", "", poisson_intro(runs, cfg), "",
            *poisson_table(runs, f"TTFT ≤ {cfg['slo_ttft_s']:g} s, ITL ≤ {cfg['slo_itl_s'] * 1e3:g} ms"), "",
            "**(c') The same request set on the base model, every request there at time 0**: swapserve's "
            "continuous batching against HF `generate` serving it the way a static server does (batches in arrival "
            "order, each left-padded to its longest prompt and run to its longest output; only each request's own "
            "tokens count).", "", *anchor_table(runs, tr.get("hf")), "",
            f"### (d) {d['requests']} adapters vs the base model", "",
            f"{d['requests']} concurrent requests ({d['prompt']}-token prompts, {d['max_tokens']} output tokens) on "
            f"{d['adapters']} distinct adapters ({_lora(runs[0])}), then the same on the base model, in one engine "
            f"(max_loras = max_num_seqs = {d['requests']}); {rounds}.", "", *wide_table(runs), ""]
