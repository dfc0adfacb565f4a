"""The console's routes: the shell is public and holds no data; /v1/stats and /v1/stats/adapters need the API
key and report what the engine and /metrics report; the stats window's percentiles are Prometheus'."""
from __future__ import annotations

import fnmatch
import math
import tomllib
from pathlib import Path

from server.api.console import STATIC
from server.api.stats import StatsWindow, histogram_quantile

from .conftest import API_KEY


def test_the_shell_is_public_and_the_data_routes_need_the_api_key(auth_server):
    with auth_server.client() as http:
        index = http.get("/")
        assert index.status_code == 200 and "src=\"/console/app.js\"" in index.text
        assert "default-src 'self'" in index.headers["content-security-policy"]
        for asset in ("/console/app.js", "/console/style.css"):
            assert http.get(asset).status_code == 200, asset
        assert http.get("/console/config").json() == {"api_key_required": True, "admin_key_required": True}
        for route in ("/v1/stats", "/v1/stats/adapters"):
            assert http.get(route).status_code == 401, route
            assert http.get(route, headers={"Authorization": "Bearer wrong"}).status_code == 401, route
            assert http.get(route, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200, route


def test_adapters_listing_covers_registered_disk_and_failed_adapters(server):
    with server.client() as http:
        assert http.post("/v1/completions", json={"model": "beta", "prompt": "hello", "max_tokens": 3}).status_code == 200
        assert http.post("/v1/completions", json={"model": "broken", "prompt": "hi", "max_tokens": 2}).status_code >= 400
        rows = {a["name"]: a for a in http.get("/v1/stats/adapters").json()["data"]}
        admin = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
    for name, entry in admin.items():  # registered: the admin listing's fields and tier, less the source path
        assert rows[name]["registered"] and rows[name]["tier"] == entry["tier"]
        assert "source" not in rows[name]
    assert rows["beta"]["type"] == "lora" and rows["beta"]["rank"] == 8 and rows["beta"]["requests"] >= 1
    assert rows["beta"]["tokens_served"] >= 1 and "q_proj" in rows["beta"]["target_modules"]
    if "gamma" not in admin:  # never requested here (other tests in the session may have)
        assert rows["gamma"] == rows["gamma"] | {"tier": "disk", "registered": False, "type": "lora", "rank": 8}
        assert rows["gamma"]["size_bytes"] > 0 and "q_proj" in rows["gamma"]["target_modules"]
    assert not rows["broken"]["registered"] and "not valid JSON" in rows["broken"]["error"]


def test_stats_report_the_engine_and_windowed_rates(server):
    with server.client() as http:
        first = http.get("/v1/stats").json()
        assert http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4}).status_code == 200
        second = http.get("/v1/stats").json()
    assert second["model"] == "tiny-llama" and second["engine"]["device"] == "cpu"
    assert second["totals"]["generation_tokens"] >= first["totals"]["generation_tokens"] + 4
    assert second["window"]["seconds"] > 0 and second["window"]["generation_tokens_per_s"] > 0
    assert second["window"]["ttft"]["p50"] is not None and second["max_loras"] == 2
    assert set(second["adapter_tiers"]) == {"device", "host", "disk"}


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 2.0), (0.5, 6.0), (1.0, 10.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, buckets) == 0.1 + 0.4 * (3 / 4)  # rank 5: 3 of the 4 in (0.1, 0.5]
    assert histogram_quantile(0.1, buckets) == 0.05
    assert histogram_quantile(0.99, [(1.0, 1.0), (math.inf, 5.0)]) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_the_window_compares_with_its_oldest_snapshot_inside_it():
    def snap(tokens: float) -> dict:
        return {"generation_tokens": tokens, "prompt_tokens": 0.0, "requests": 0.0,
                **{k: [(1.0, 0.0), (math.inf, 0.0)] for k in ("ttft", "itl", "e2e", "queue")}}
    window = StatsWindow(window_s=10)
    assert window.observe(0.0, snap(0))["generation_tokens_per_s"] is None
    assert window.observe(5.0, snap(50))["generation_tokens_per_s"] == 10
    assert window.observe(20.0, snap(250))["generation_tokens_per_s"] == 200 / 15  # from t=5, the last one <= 10
    assert window.observe(31.0, snap(250))["generation_tokens_per_s"] == 0  # from t=20


def test_every_console_file_is_package_data():
    """An installed (not editable) package must carry the shell: each file matches a package-data glob."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["server"]
    files = [p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir() if p.is_file()]
    assert {"console/index.html", "console/app.js", "console/style.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, g) for g in globs), name


def test_a_registered_adapter_not_loaded_yet_is_described_from_its_config(server, adapter_root):
    """An on-demand adapter is registered before its load finishes: until then its config says what it is."""
    store = server.engine.engine.store
    store.register("pending", str(adapter_root / "beta"))
    try:
        with server.client() as http:
            rows = {a["name"]: a for a in http.get("/v1/stats/adapters").json()["data"]}
    finally:
        store.unregister("pending")
    assert rows["pending"] == rows["pending"] | {"registered": True, "tier": "disk", "type": "lora", "rank": 8}
    assert "q_proj" in rows["pending"]["target_modules"] and rows["pending"]["size_bytes"] > 0
