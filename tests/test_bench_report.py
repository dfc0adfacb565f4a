"""bench/markdown.py: the BENCHMARKS.md headline computes its ratios from the results JSON, including the naive
serial rate pooled over every cell (the serial flow does not batch, so one rate serves all cells)."""
from __future__ import annotations

from bench.markdown import headline, pooled_naive


def cell(n: int, k: int, base: float, ours: float, naive_tokens: int, naive_seconds: float) -> dict:
    return {"concurrency": n, "adapters": k, "base": {"tok_s": base}, "swapserve": {"tok_s": ours},
            "peft": {"tok_s": base / 2},
            "naive": {"tok_s": naive_tokens / naive_seconds, "tokens": naive_tokens, "seconds": naive_seconds,
                      "requests": 3}}


def test_headline_uses_the_top_cell_and_the_pooled_naive_rate():
    cells = [cell(8, 4, 60.0, 50.0, 96, 8.0),  # naive 12 tok/s
             cell(32, 16, 100.0, 90.0, 96, 12.0)]  # naive 8 tok/s in this cell alone
    pooled = pooled_naive(cells)
    assert pooled == {"tok_s": 192 / 20.0, "requests": 6}
    text = headline({"cells": cells, "config": {"naive_requests": 3}})
    assert "32 concurrent requests over 16 distinct adapters" in text
    assert "**0.90x the base model's HF batched throughput**" in text
    assert "**11.25x the seed's naive serial flow**" in text  # the cell's own anchor: 90 / 8
    assert "9.6 tok/s" in text and "**9.38x that pooled naive rate**" in text  # 90 / 9.6
    assert "8x naive needs 0.77x base" in text  # 8 * 9.6 / 100


def test_headline_stays_on_the_target_cell_and_64_adapters_get_a_cell():
    """The issue's grid has 64 adapters over concurrency up to 32: that point runs as 64 requests, one adapter
    each, and the headline stays on the 32 x 16 cell the targets are set on."""
    from bench.config import parse_args

    assert parse_args([]).cells[-1] == (64, 64) and parse_args([]).max_concurrency == 64
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
            return await run_concurrent(driver, [BenchRequest([5, 6, 7], "x", 9), BenchRequest([5, 6], None, 4)])
        finally:
            await driver.close()

    try:
        traces = asyncio.run(go())
    finally:
        server.close()
    assert [t.tokens for t in traces] == [9, 4] and all(t.ttft > 0 for t in traces)


def test_http_section_sets_the_http_cell_beside_the_in_process_one():
    from bench.markdown import http_section

    intf = {"streams": 16, "loads": 10, "loads_seconds": 0.5, "quiet_itl_p99_ms": 100.0,
            "loading_itl_p99_ms": 110.0, "itl_p99_rise": 0.1}
    results = {"cells": [cell(32, 16, 100.0, 90.0, 96, 12.0)],
               "http": {"concurrency": 32, "adapters": 16, "interference": intf,
                        "swapserve": {"tok_s": 81.0, "ttft_p50_ms": 1, "ttft_p99_ms": 2, "itl_p50_ms": 3,
                                      "itl_p99_ms": 4}}}
    text = "\n".join(http_section(results))
    assert "| 32 | 16 | 90.0 | **81.0** | 0.90x | **0.81x** |" in text and "**+10%**" in text
    assert http_section({"cells": []}) == []
