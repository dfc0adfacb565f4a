"""The real-traffic section of the benchmark (bench/traffic.py and what it stands on): deterministic request
sets, Poisson arrival times, goodput and round medians, the --traffic flags, the workloads end to end on the
tiny model (this tree's engine in-process, engine v1 in a subprocess on its own checkout), HF's static
batches and the "Real traffic" markdown. Sizes are tiny and nothing asserts on a measured time."""
from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from bench.config import TrafficConfig, parse_args, traffic_fields
from bench.request_set import RequestSet, lognormal_lengths, poisson_offsets, random_prompt, rng_for, round_robin
from bench.timing import Trace, goodput, median_range, steady_itl

REPO = Path(__file__).resolve().parents[1]
TINY = dict(rounds=2, requests=5, short_prompt=8, long_prompt=80, max_tokens=4, adapters=2, prefix_tokens=64,
            prefix_tail=4, prefix_max_tokens=3, poisson_requests=6, prompt_median=16, prompt_sigma=1.0, prompt_min=4,
            prompt_max=96, output_median=6, output_sigma=0.5, output_min=2, output_max=12, wide_requests=4,
            max_num_seqs=4)


def test_request_set_is_the_same_for_a_seed_and_long_tailed_within_its_clip():
    cfg = TrafficConfig(poisson_requests=400, prompt_median=96, prompt_sigma=1.0, prompt_min=16, prompt_max=2048)
    a, b = RequestSet.long_tailed(cfg, 0), RequestSet.long_tailed(cfg, 0)
    assert a == b and RequestSet.long_tailed(cfg, 1) != a
    assert len(a) == 400 and a.gaps[0] == 0.0
    assert min(a.prompt_lens) >= 16 and max(a.prompt_lens) <= 2048
    assert min(a.output_lens) >= cfg.output_min and max(a.output_lens) <= cfg.output_max
    p = a.describe()["prompt"]
    assert 70 < p["p50"] < 130 and p["p90"] > 2.5 * p["p50"]  # sigma 1: p90 / p50 = e^1.28 = 3.6 before clipping
    assert set(lognormal_lengths(rng_for(0), 50, 1000.0, 2.0, 5, 9)) <= {5, 6, 7, 8, 9}


def test_lengths_are_the_quantiles_in_a_seeded_order():
    """A stratified draw: n lengths at the lognormal's (i + 1/2) / n quantiles, so 4 lengths of median 100,
    sigma 1 are 100 * e^z for z at the 12.5/37.5/62.5/87.5% points of N(0, 1), whatever the seed."""
    from statistics import NormalDist

    want = [round(100 * np.exp(NormalDist().inv_cdf(q))) for q in (0.125, 0.375, 0.625, 0.875)]
    one, two = (lognormal_lengths(rng_for(seed), 4, 100, 1.0, 1, 10_000) for seed in (1, 2))
    assert sorted(one) == sorted(two) == want == [32, 73, 138, 316]
    cfg = TrafficConfig()  # the default set reaches far into its tail with 32 requests
    assert max(RequestSet.long_tailed(cfg, 0).prompt_lens) > 1000


def test_each_run_draws_fresh_prompts_of_the_set_lengths():
    rs = RequestSet([3, 7], [4, 4], [0.0, 1.0])
    one, two = rs.prompts(400, 0, "rate-0"), rs.prompts(400, 0, "rate-1")
    assert [len(p) for p in one] == [3, 7] == [len(p) for p in two] and one != two
    assert one == rs.prompts(400, 0, "rate-0")
    ids = random_prompt(rng_for(0, "x"), 1000, 400)
    assert min(ids) >= 100 and max(ids) < 400  # clear of the bottom of a small vocabulary, inside it
    assert min(random_prompt(rng_for(0), 1000, 49152)) >= 1000


def test_poisson_offsets_scale_one_draw_by_the_rate():
    rs = RequestSet.long_tailed(TrafficConfig(poisson_requests=2000), 3)
    slow, fast = poisson_offsets(rs.gaps, 0.5), poisson_offsets(rs.gaps, 2.0)
    assert slow[0] == fast[0] == 0.0 and np.allclose(np.array(slow) / 4, fast)
    assert all(x <= y for x, y in zip(fast, fast[1:]))
    assert 1.9 < (len(fast) - 1) / fast[-1] < 2.1  # the mean rate of 2000 seeded unit-rate gaps, scaled
    assert round_robin(["a", "b", None], 5) == ["a", "b", None, "a", "b"]


def trace(sent: float, *arrivals: float) -> Trace:
    return Trace(sent, list(arrivals), [1] * len(arrivals))


def test_goodput_needs_both_the_ttft_and_the_mean_itl():
    traces = [trace(0.0, 1.0, 1.1, 1.2),  # TTFT 1 s, mean ITL 100 ms: good
              trace(0.0, 2.5, 2.6),  # TTFT 2.5 s: late
              trace(1.0, 1.5, 2.0, 2.5),  # mean ITL 500 ms: slow
              trace(2.0, 3.0),  # one token: no ITL to miss
              Trace(3.0)]  # never answered: counted, never good
    assert traces[2].mean_itl == pytest.approx(0.5) and traces[3].mean_itl is None
    out = goodput(traces, ttft_s=2.0, itl_s=0.2)
    assert (out["good"], out["of"], out["share"]) == (2, 5, 0.4)
    assert out["good_req_s"] == pytest.approx(2 / 3.0)  # first send 0.0 -> last token 3.0


def test_steady_itl_counts_the_gaps_once_every_stream_decodes():
    """Over HTTP the first request of a burst can be prefilled alone, its second token waiting for the others'
    prefill: that 2 s gap is in summarize's ITL but not in the steady-state one the interference rows use."""
    early = trace(0.0, 0.3, 2.3, 2.5, 2.7)  # its first gap (0.3 -> 2.3) spans the others' prefill
    late = [trace(0.0, 2.2, 2.4, 2.6), trace(0.0, 2.3, 2.5, 2.7)]
    steady = steady_itl([early, *late])  # from 2.3, the last first token: every gap is 200 ms
    assert steady["itl_p50_ms"] == pytest.approx(200) and steady["itl_p99_ms"] == pytest.approx(200)
    assert early.itls_from(2.3) == pytest.approx([0.2, 0.2]) and len(early.itls) == 3


def test_median_range_leaves_missing_rounds_out():
    assert median_range([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert median_range([None])["median"] is None


def test_traffic_flags_are_typed_like_the_fields():
    assert traffic_fields(["poisson_requests=64", "loads=0.5,1", "slo_itl_s=0.1"]) == {
        "poisson_requests": 64, "loads": [0.5, 1.0], "slo_itl_s": 0.1}
    with pytest.raises(ValueError, match="no such field"):
        traffic_fields(["poisson=3"])
    with pytest.raises(ValueError, match="poisson_requests takes a int"):
        traffic_fields(["poisson_requests=1.5"])
    quick = parse_args(["--quick", "--traffic", "rounds=2"])
    assert quick.traffic.rounds == 2 and quick.traffic.poisson_requests == 12  # the flag over the preset
    assert parse_args([]).traffic.max_model_len == 2048 + 512 + 8
    with pytest.raises(SystemExit):
        parse_args(["--skip-traffic", "--traffic-baseline", "HEAD"])


def test_traffic_module_leaves_server_to_whoever_comes_first_on_the_path():
    """bench/baseline.py's subprocess puts another checkout first on sys.path in main(): nothing bench.traffic
    imports at module level may have imported `server` by then."""
    code = "import sys, bench.traffic; assert 'server' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def tiny_spec(model_dir: Path, adapter: Path, root: Path):
    from bench.fixtures import copy_adapters
    from bench.traffic import TrafficSpec

    made = copy_adapters(adapter, ["t00", "t01", "t02", "t03"], root, 0)
    return TrafficSpec(str(model_dir), {n: str(p) for n, p in made.items()}, str(root), TINY, lora_rank=8)


def check_run(run: dict, cfg: TrafficConfig) -> None:
    """What every engine's traffic run must hold, whatever its speed."""
    a = run["long_one"]
    assert len(a["rounds"]) == cfg.rounds and a["ratio"]["n"] == cfg.rounds
    assert all(r[c]["tokens"] == cfg.requests * cfg.max_tokens for r in a["rounds"] for c in "AB")
    assert all(r["L"]["tokens"] == 1 for r in a["rounds"])  # the long prompt alone: its prefill
    assert all(r["bound"] == pytest.approx((r["A"]["seconds"] + r["L"]["seconds"]) / r["A"]["seconds"])
               for r in a["rounds"])
    rs = RequestSet.long_tailed(cfg, 0)
    c = run["poisson"]
    assert len(c["rates"]) == 3 and c["base_all_at_once"]["tokens"] == sum(rs.output_lens)
    assert all(r["tokens"] == sum(rs.output_lens) and r["goodput"]["of"] == len(rs) for r in c["rates"])
    assert c["rates"][0]["adapters"] == cfg.adapters and c["base_all_at_once"]["adapters"] == 0
    d = run["wide"]
    assert d["adapters"] == cfg.wide_requests and d["rounds"][0]["base"]["tokens"] == cfg.wide_requests * cfg.max_tokens


def test_traffic_workloads_run_on_this_engine(tiny_model_dir, adapters, tmp_path):
    from bench.traffic import run_traffic

    spec = tiny_spec(tiny_model_dir, adapters["lora"], tmp_path)
    run = asyncio.run(run_traffic(spec))
    check_run(run, spec.config)
    assert run["engine"]["paged"] and run["engine"]["max_num_seqs"] == 4 and run["wide_engine"]["max_loras"] == 4
    b = run["prefix"]["rounds"]
    assert [(r["cached_first"], r["cached_second"]) for r in b] == [(0, 64), (0, 64)]  # fresh prefix each round
    c = run["poisson"]["rates"]
    assert [r["rate"] for r in c] == pytest.approx([x * run["poisson"]["capacity_req_s"] for x in (0.3, 0.6, 0.9)])
    assert all(r["preemptions"] == 0 and r["prefix_hits"] == 0 and r["prefix_queries"] > 0 for r in c)


def test_traffic_baseline_runs_engine_v1_from_its_own_checkout(tiny_model_dir, adapters, tmp_path):
    """bench/baseline.py on b715e68 (the last commit before engine v2): its server/ comes from `git archive`,
    bench/ from this tree, and (c) runs at the rates it is given."""
    from bench.baseline import run_baseline, short_commit

    try:
        short_commit("b715e68")
    except ValueError:
        pytest.skip("b715e68 is not in this clone's history")
    spec = tiny_spec(tiny_model_dir, adapters["lora"], tmp_path)
    run = asyncio.run(run_baseline("b715e68", spec, [50.0, 100.0, 200.0]))
    check_run(run, spec.config)
    assert run["commit"] == "b715e68" and "swapserve-b715e68-" in run["server"]
    assert not run["engine"]["paged"] and run["engine"]["token_budget"] == 2048  # v1's default prompt budget
    assert [r["rate"] for r in run["poisson"]["rates"]] == [50.0, 100.0, 200.0]
    assert run["prefix"]["rounds"][0]["cached_second"] is None and run["poisson"]["rates"][0]["preemptions"] is None


def test_hf_static_batches_count_each_request_its_own_tokens(tiny_model_dir, adapters):
    from bench.anchors import Anchors
    from bench.timing import summarize

    anchors = Anchors(tiny_model_dir, {"lora": adapters["lora"]})
    prompts = [[5, 6, 7], [8] * 9, [9, 10], [11] * 5, [12]]
    traces = anchors.static_batches(anchors.base, prompts, [3, 5, 2, 4, 1], batch=2)
    assert [t.tokens for t in traces] == [3, 5, 2, 4, 1]
    assert len({t.sent for t in traces}) == 1  # all there at time 0
    assert traces[2].arrivals[0] >= traces[1].arrivals[-1]  # the second batch starts after the first ends
    assert summarize(traces)["tokens"] == 15


def run_dict(label_commit: str, paged: bool, ratio_a: float, ratio_b: float, ratio_d: float, base_tok_s: float) -> dict:
    """A results["traffic"]["runs"] entry with round medians of one value each."""
    def mr(x):
        return median_range([x, x * 0.9, x * 1.1])

    stats = {"ttft_p50_ms": 10.0, "ttft_p99_ms": 20.0, "itl_p50_ms": 30.0, "itl_p99_ms": 40.0}
    engine = {"paged": paged, "max_num_seqs": 32, "max_loras": 16, "max_model_len": 2568, "token_budget": 512 if paged
              else 2048, "kv_bytes": 4e9, "block_size": 16, "enable_prefix_caching": True, "max_lora_rank": 16}
    rate = {"rate": 0.5, "load": 0.9, "tok_s": 100.0, "req_s": 0.45, **stats, "peak_kv_used_bytes": 2e8,
            "peak_kv_held_bytes": 4e9, "peak_running": 12, "peak_waiting": 3,
            "goodput": {"good": 27, "of": 32, "share": 27 / 32}, "preemptions": 0 if paged else None,
            "prefix_hits": 0 if paged else None, "prefix_queries": 5000 if paged else None}
    long_one = {"requests": 32, "max_tokens": 32, "short_prompt": 32, "long_prompt": 1500, "adapters": 16,
                "wall_A_s": mr(10.0), "wall_B_s": mr(10.0 * ratio_a), "ratio": mr(ratio_a), "long_ttft_ms": mr(5000.0),
                **{f"short_{k}_{c}": mr(v) for k, v in stats.items() for c in "AB"}}
    if paged:  # the work-conserving bound (cell L) came after engine v1's runs were stored
        long_one.update(wall_L_s=mr(6.0), bound=mr(1.6), over_bound=mr(ratio_a / 1.6))
    cached = mr(1200.0) if paged else median_range([None])
    return {"label": "x", "commit": label_commit, "threads": 1, "load_start": "1.00", "load_end": "1.50",
            "engine": engine, "wide_engine": {**engine, "max_num_seqs": 64, "max_loras": 64},
            "long_one": long_one,
            "prefix": {"prefix_tokens": 1200, "tail_tokens": 16, "max_tokens": 16, "ttft_first_ms": mr(4000.0),
                       "ttft_second_ms": mr(4000.0 * ratio_b), "ratio": mr(ratio_b),
                       "cached_first": mr(0.0) if paged else cached, "cached_second": cached},
            "poisson": {"set": {"requests": 32, "prompt": {"mean": 150.0, "p50": 96.0, "p90": 350.0, "max": 900,
                                                           "total": 4800},
                                "output": {"mean": 40.0, "p50": 32.0, "p90": 80.0, "max": 200, "total": 1280}},
                        "capacity_req_s": 0.55, "base_all_at_once": {"tok_s": base_tok_s, "req_s": 0.6, **stats},
                        "rates": [rate]},
            "wide": {"requests": 64, "adapters": 64, "prompt": 32, "max_tokens": 32, "adapters_tok_s": mr(90.0),
                     "base_tok_s": mr(90.0 / ratio_d), "ratio": mr(ratio_d)}}


def test_real_traffic_section_sets_the_engines_side_by_side():
    from bench.traffic_markdown import traffic_section

    hf = {"system": "base_onednn", "batch": 32, "tok_s": 80.0, "req_s": 0.5, "ttft_p50_ms": 1.0,
          "ttft_p99_ms": 2.0, "itl_p50_ms": 3.0, "itl_p99_ms": 4.0}
    results = {"traffic": {"config": asdict(TrafficConfig()), "hf": hf,
                           "runs": [run_dict("6bc0125", True, 1.1, 0.05, 0.9, 100.0),
                                    run_dict("b715e68", False, 3.5, 1.0, 0.67, 72.0)]}}
    text = "\n".join(traffic_section(results))
    assert "## Real traffic" in text and "engine v1 (b715e68) in a subprocess" in text
    assert ("| (a) wall time, one long prompt among short ones / all short (the bound: all short + the long "
            "prompt alone) | ≤ 1.3x | **1.10x (bound 1.60x)** | **3.50x** |") in text
    assert ("| (c') base model, continuous batching / HF static batches at equal GEMM | > 1.0x | **1.25x** | "
            "**0.90x** |") in text
    assert ("| engine v2 (6bc0125) | 10.0 (9.0–11.0) | 11.0 (9.9–12.1) | **1.10x (0.99–1.21)** | 6.0 (5.4–6.6) | "
            "1.60x (1.44–1.76) | 0.69x (0.62–0.76) |") in text
    assert "| **3.50x (3.15–3.85)** | – | – | – |" in text  # a stored run from before cell L
    assert "| 1200 (1080–1320) / 1200 (1080–1320) |" not in text and "0 / 1200 (1080–1320) |" in text
    assert "– (no prefix cache)" in text
    assert "lognormal(median 80, σ 1.2) clipped to [16, 2048] (drawn: mean 150, p50 96, p90 350, max 900" in text
    assert "Request i is on adapter i mod 16 (" in text and "{adapters}" not in text
    assert ("| engine v1 (b715e68) | 0.500 (0.90x) | 100.0 | 0.450 | 10 | 20 | 30 | 40 | **84%** (27/32) | "
            "200.0 |") in text
    assert "| – | – |" in text  # v1 has no preemption or prefix-hit counters
    assert "**0.67x (0.60–0.74)**" in text  # (d) v1
    assert traffic_section({}) == []
    alone = {"traffic": {**results["traffic"], "runs": results["traffic"]["runs"][:1],
                         "baseline_error": "b715e68: the traffic run failed (exit 1)"}}
    text = "\n".join(traffic_section(alone))
    assert "The baseline run failed (b715e68: the traffic run failed (exit 1))" in text
    assert "engine v1" not in text and "runs in this process" in text
