"""The Grafana dashboard (deploy/grafana/swapserve.json) against a live server: every series each PromQL expression
reads is on /metrics, scraped after traffic that makes every labelled series appear."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import engine_config, live_server

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "swapserve.json"
# a series name: our names are all namespaced (vllm:..., swapserve:...), which tells them from PromQL's own words
METRIC = re.compile(r"\b[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]+")
SELECTED = re.compile(r"\b([a-zA-Z_][a-zA-Z0-9_:]*)\s*[{\[]")  # anything followed by a selector or a range


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.fullmatch(r"label_values\((.*),\s*\w+\)", query)[1])
    return exprs


def names_in(expr: str) -> set[str]:
    return set(METRIC.findall(re.sub(r'"[^"]*"', '""', expr)))  # not inside label matchers' strings


@pytest.fixture(scope="module")
def exported(tiny_model_dir, adapters, tmp_path_factory) -> set[str]:
    """Sample names on /metrics after traffic that fills every labelled series: base and adapter requests, a
    refused one, and three adapters through one device slot and one host entry (evictions from both)."""
    root = tmp_path_factory.mktemp("grafana-root")
    for name in ("a", "b", "c"):
        shutil.copytree(adapters["lora"], root / name)
    config = engine_config(tiny_model_dir, root, max_loras=1, max_cpu_loras=1)
    with live_server(config) as server, server.client() as http:
        for model in (None, "a", "b", "c", "a"):
            body = {"prompt": "hello", "max_tokens": 3, **({"model": model} if model else {})}
            assert http.post("/v1/completions", json=body).status_code == 200
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        text = http.get("/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_series_the_dashboard_reads_is_exported(dashboard, exported):
    exprs = expressions(dashboard)
    assert len(exprs) > 20
    for expr in exprs:
        stripped = re.sub(r'"[^"]*"', '""', expr)
        for word in SELECTED.findall(stripped):
            assert METRIC.fullmatch(word) or word in {"by", "without"}, f"{word!r} in {expr}: not a series name"
        missing = names_in(expr) - exported
        assert not missing, f"{expr}: {sorted(missing)} not on /metrics"
    read = set().union(*map(names_in, exprs))
    for needed in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                   "vllm:e2e_request_latency_seconds_bucket", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "swapserve:adapter_cache_entries",
                   "swapserve:adapter_requests_total", "swapserve:adapter_generation_tokens_total",
                   "swapserve:adapter_errors_total"):
        assert needed in read, needed
