"""Tenant keys over HTTP: each key reaches only the adapters its globs match (and the base model when allowed) on
every route, a denied on-demand adapter is never loaded, /v1/models shows only what the key may use; per-key
rpm / tpm / max_concurrent answer 429 with Retry-After; the key file reloads without a restart; keys never
reach the logs."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from server.api.settings import ServerConfig
from .conftest import engine_config, live_server
from .helpers import metric_value, wait_for

API_KEY, ADMIN_KEY = "sk-unrestricted-0000", "sk-admin-0000"
KEY_A, KEY_B, KEY_RPM, KEY_TPM, KEY_CONC = ("sk-tenant-a-0001", "sk-tenant-b-0002", "sk-rpm-0003", "sk-tpm-0004",
                                            "sk-conc-0005")
KEY_BROKEN = "sk-broken-0006"
ALL_KEYS = (API_KEY, ADMIN_KEY, KEY_A, KEY_B, KEY_RPM, KEY_TPM, KEY_CONC, KEY_BROKEN)
TENANTS = [
    {"key": KEY_A, "name": "tenant-a", "adapters": ["alph*", "gamma"]},
    {"key": "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest(), "name": "tenant-b", "base_model": True},
    {"key": KEY_RPM, "name": "rpm", "base_model": True, "rpm": 2},
    {"key": KEY_TPM, "name": "tpm", "base_model": True, "tpm": 40},
    {"key": KEY_CONC, "name": "conc", "adapters": ["alpha"], "base_model": True, "max_concurrent": 1},
    {"key": KEY_BROKEN, "name": "broken-user", "adapters": ["broken"]},
]
PROMPT = [1, 40, 41, 42, 43]  # 5 tokens
LONG = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def write_keys(path, entries) -> str:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(entries if isinstance(entries, str) else json.dumps(entries, indent=2))
    os.replace(tmp, path)
    return str(path)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("keys") / "keys.json", TENANTS)


@pytest.fixture(scope="module")
def tenant_server(tiny_model_dir, adapter_root, keys_file):
    config = engine_config(tiny_model_dir, adapter_root)
    server_config = ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY, api_keys_file=keys_file,
                                 enable_log_requests=True, shutdown_timeout=2)
    with live_server(config, server_config) as live:
        yield live


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def complete(http, key, **fields):
    return http.post("/v1/completions", headers=bearer(key),
                     json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0, **fields})


def forbidden(response, param: str = "model") -> bool:
    error = response.json()["error"]
    return response.status_code == 403 and error["type"] == "permission_error" and error["param"] == param


def operator_metric(http, name: str, **labels) -> float:
    """A /metrics value, read with the admin key: with tenant keys /metrics is the operator's."""
    return metric_value(http, name, headers=bearer(ADMIN_KEY), **labels)


def loaded(server) -> set[str]:
    return {a["name"] for a in server.engine.list_adapters()}


def test_a_key_reaches_only_its_adapters_on_every_route(tenant_server):
    with tenant_server.client() as http:
        assert complete(http, KEY_A, model="alpha").status_code == 200
        assert forbidden(complete(http, KEY_A, model="beta"))
        assert forbidden(complete(http, KEY_A, model="tiny-llama")) and forbidden(complete(http, KEY_A))
        assert complete(http, KEY_A, adapters=[{"name": "alpha", "scale": 0.5}, {"name": "gamma"}]).status_code == 200
        # every component at scale 0 is the base model alone, which tenant-a may not use
        assert forbidden(complete(http, KEY_A, adapters=[{"name": "alpha", "scale": 0}]), "adapters")
        mixed = complete(http, KEY_A, adapters=[{"name": "alpha"}, {"name": "beta", "scale": 0.3}])
        assert forbidden(mixed, "adapters") and "'beta'" in mixed.json()["error"]["message"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert forbidden(http.post("/v1/chat/completions", headers=bearer(KEY_A), json={**chat, "model": "beta"}))
        assert http.post("/v1/chat/completions", headers=bearer(KEY_A),
                         json={**chat, "model": "alpha"}).status_code == 200
        tgi = http.post("/generate", headers=bearer(KEY_A), json={"inputs": "hi", "parameters": {"adapter_id": "beta"}})
        assert tgi.status_code == 403 and set(tgi.json()) == {"error", "error_type"}
        tgi_mix = http.post("/generate", headers=bearer(KEY_A), json={
            "inputs": "hi", "parameters": {"adapters": [{"name": "alpha"}, {"name": "beta"}], "max_new_tokens": 2}})
        assert tgi_mix.status_code == 403
        assert http.post("/generate", headers=bearer(KEY_A), json={
            "inputs": "hi", "parameters": {"adapter_id": "alpha", "max_new_tokens": 2}}).status_code == 200
        assert forbidden(http.post("/tokenize", headers=bearer(KEY_A), json={"model": "beta", "prompt": "hi"}))
        assert forbidden(http.post("/detokenize", headers=bearer(KEY_A), json={"model": "tiny-llama", "tokens": [1]}))
        assert http.post("/tokenize", headers=bearer(KEY_A), json={"model": "alpha", "prompt": "hi"}).status_code == 200
        assert http.post("/tokenize", headers=bearer(KEY_A), json={"prompt": "hi"}).status_code == 200
        assert forbidden(complete(http, KEY_A, model="no-such-adapter"))  # no hint whether a denied name exists
        assert complete(http, KEY_A, model="alpha-missing").status_code == 404  # allowed name, not there


def test_a_denied_on_demand_adapter_is_never_loaded(tenant_server):
    with tenant_server.client() as http:
        assert "beta" not in loaded(tenant_server)
        assert forbidden(complete(http, KEY_A, model="beta"))
        assert forbidden(complete(http, KEY_A, adapters=[{"name": "alpha"}, {"name": "beta"}]), "adapters")
        assert forbidden(complete(http, KEY_B, model="beta"))
        store = tenant_server.engine.engine.store
        assert "beta" not in loaded(tenant_server) and "beta" not in store.entries and store.failure("beta") is None
        assert all(entry.in_flight == 0 for entry in store.entries.values())
        admin = http.get("/v1/adapters", headers=bearer(ADMIN_KEY)).json()["data"]
        assert "beta" not in {a["name"] for a in admin}


def test_sha256_keys_the_base_model_and_models_lists_per_key(tenant_server):
    with tenant_server.client() as http:
        assert complete(http, KEY_A, model="alpha").status_code == 200  # alpha is loaded and listed
        assert complete(http, KEY_B).status_code == 200 and complete(http, KEY_B, model="tiny-llama").status_code == 200
        assert forbidden(complete(http, KEY_B, model="alpha"))
        hashed = "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()
        assert complete(http, hashed).status_code == 401  # the file's digest is not a key

        def models(key):
            return {m["id"] for m in http.get("/v1/models", headers=bearer(key)).json()["data"]}

        assert "tiny-llama" not in models(KEY_A) and "alpha" in models(KEY_A) and models(KEY_A) <= {"alpha", "gamma"}
        assert models(KEY_B) == {"tiny-llama"} and {"tiny-llama", "alpha"} <= models(API_KEY)
        assert http.get("/v1/models/alpha", headers=bearer(KEY_B)).status_code == 404
        assert http.get("/v1/models/alpha", headers=bearer(KEY_A)).json()["id"] == "alpha"
        assert http.get("/v1/models/tiny-llama", headers=bearer(KEY_A)).status_code == 404


def test_keys_that_are_not_admin_keys(tenant_server):
    with tenant_server.client() as http:
        for key in (KEY_A, KEY_B, API_KEY, "sk-wrong"):
            assert http.get("/v1/adapters", headers=bearer(key)).status_code == 401
        assert complete(http, "sk-wrong").status_code == 401 and complete(http, ADMIN_KEY).status_code == 401
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).status_code == 401
        assert complete(http, API_KEY, model="beta").status_code == 200  # --api-key: unrestricted, loads on demand


def rate_limited(response) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["type"] == "rate_limit_error"
    return int(response.headers["retry-after"])


def test_rpm_gives_429_with_retry_after(tenant_server):
    with tenant_server.client() as http:
        assert complete(http, KEY_RPM).status_code == 200 and complete(http, KEY_RPM).status_code == 200
        assert 1 <= rate_limited(complete(http, KEY_RPM)) <= 60
        tgi = http.post("/generate", headers=bearer(KEY_RPM), json={"inputs": "hi"})
        assert tgi.status_code == 429 and tgi.json()["error_type"] == "overloaded" and "retry-after" in tgi.headers
        assert operator_metric(http, "swapserve:tenant_requests_total", tenant="rpm") == 2
        assert operator_metric(http, "swapserve:tenant_rejected_requests_total", tenant="rpm", reason="rpm") == 2
        assert complete(http, KEY_B).status_code == 200  # another key is not limited by it


def test_tpm_charges_prompt_and_completion_tokens(tenant_server):
    with tenant_server.client() as http:
        assert complete(http, KEY_TPM, max_tokens=10, ignore_eos=True).status_code == 200  # 5 + 10
        assert complete(http, KEY_TPM, max_tokens=10, ignore_eos=True).status_code == 200  # 30 of 40
        assert 1 <= rate_limited(complete(http, KEY_TPM, max_tokens=10)) <= 60  # would reach 45
        assert complete(http, KEY_TPM, max_tokens=5, ignore_eos=True).status_code == 200  # exactly 40
        too_big = complete(http, KEY_TPM, max_tokens=36)
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
        assert wait_for(lambda: operator_metric(http, "swapserve:tenant_prompt_tokens_total", tenant="tpm") == 15)
        assert operator_metric(http, "swapserve:tenant_generation_tokens_total", tenant="tpm") == 25


def test_max_concurrent_gives_429_while_a_request_runs(tenant_server):
    tenancy = tenant_server.app.state.tenancy
    with tenant_server.client() as a, tenant_server.client() as b:
        with a.stream("POST", "/v1/completions", headers=bearer(KEY_CONC), json={**LONG, "stream": True}) as running:
            assert running.status_code == 200
            assert rate_limited(complete(b, KEY_CONC)) == 1
            assert rate_limited(complete(b, KEY_CONC, model="alpha")) == 1
        assert wait_for(lambda: tenancy.limits.in_flight("conc") == 0)  # the stream closed: aborted, freed
        assert complete(b, KEY_CONC).status_code == 200
        refused = complete(b, KEY_CONC, max_tokens=600)  # admitted, then refused by the engine (over the context)
        assert refused.status_code == 400 and tenancy.limits.in_flight("conc") == 0
        assert complete(b, KEY_CONC, model="alpha").status_code == 200


def test_the_key_file_reloads_without_a_restart_and_keeps_old_keys_when_malformed(tiny_model_dir, tmp_path,
                                                                                   caplog):
    path = write_keys(tmp_path / "keys.yaml", "- key: sk-first-0001\n  name: first\n  base_model: true\n")
    config = engine_config(tiny_model_dir)
    with live_server(config, ServerConfig(api_keys_file=path, shutdown_timeout=2)) as live, live.client() as http:
        assert complete(http, "sk-first-0001").status_code == 200
        assert complete(http, "sk-second-0002").status_code == 401
        write_keys(path, "- key: sk-second-0002\n  name: second\n  base_model: true\n  rpm: 1\n")
        assert complete(http, "sk-second-0002").status_code == 200  # no restart
        assert complete(http, "sk-first-0001").status_code == 401
        assert rate_limited(complete(http, "sk-second-0002")) >= 1
        with caplog.at_level(logging.INFO, logger="swapserve"):
            write_keys(path, "- key: sk-third-0003\n  name: third\n  base_model: true\n  max_concurrnt: 1\n")
            assert complete(http, "sk-third-0003").status_code == 401
            assert rate_limited(complete(http, "sk-second-0002")) >= 1  # the old keys, with their limits
        error = next(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert "line 1 (entry 1, 'third'): unknown field 'max_concurrnt'" in error and "keeping the 1 keys" in error
        assert "sk-" not in caplog.text


def test_keys_never_reach_the_logs(tenant_server, caplog):
    with caplog.at_level(logging.DEBUG), tenant_server.client() as http:
        request_id = complete(http, KEY_A, model="alpha").json()["id"]
        complete(http, KEY_A, model="beta")
        complete(http, "sk-wrong-9999")
        http.post("/generate", headers=bearer(KEY_B), json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
        http.get("/v1/adapters", headers=bearer(ADMIN_KEY))
        assert wait_for(lambda: any(request_id in m for m in caplog.messages))
    line = next(m for m in caplog.messages if request_id in m)
    assert "tenant=tenant-a adapters=alpha " in line
    for key in (*ALL_KEYS, "sk-wrong-9999", hashlib.sha256(KEY_B.encode()).hexdigest()):
        assert key not in caplog.text


def test_tenants_never_share_prefix_cache_blocks(tenant_server):
    """Every tenant's requests are salted with its name: a prompt one tenant sent is a prefix-cache hit for
    that tenant only (a hit shows in the time to first token, and would tell another tenant what was sent).
    Unrestricted keys share among themselves; vLLM's cache_salt splits further within a tenant."""
    prompt = [1] + list(range(100, 139))  # 40 tokens: two full blocks can come from the cache

    def cached(key, **fields):
        r = complete(http, key, prompt=prompt, **fields)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    with tenant_server.client() as http:
        assert [cached(KEY_B), cached(KEY_B)] == [0, 32]
        assert cached(KEY_CONC) == 0  # another tenant, the same prompt
        assert [cached(API_KEY), cached(API_KEY)] == [0, 32]  # no tenant: unsalted
        assert [cached(KEY_B, cache_salt="s1"), cached(KEY_B, cache_salt="s1"), cached(KEY_CONC, cache_salt="s1")
                ] == [0, 32, 0]
        assert cached(API_KEY, cache_salt="s1") == 0
        # the unrestricted key's own salts live in a namespace of their own: spelling a tenant's salt reads nothing
        assert cached(API_KEY, cache_salt="tenant:8:tenant-b:") == 0
        r = complete(http, KEY_B, prompt=prompt, cache_salt="")
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_a_tenant_sees_only_its_own_adapters_stats_and_no_server_paths(tenant_server, adapter_root):
    """/v1/stats/adapters, /v1/stats, /v1/models and error messages, read with a tenant key: only the adapters it
    may use, and no filesystem path (another tenant's adapter directories, the roots); the unrestricted key and the
    admin routes keep the paths."""
    root = str(adapter_root)
    with tenant_server.client() as http:
        assert complete(http, KEY_A, model="alpha").status_code == 200
        assert complete(http, API_KEY, model="beta").status_code == 200  # another tenant's adapter, now known
        broken = complete(http, KEY_BROKEN, model="broken")
        assert broken.status_code == 400 and root not in broken.text and "<path>" in broken.text, broken.text
        assert root in complete(http, API_KEY, model="broken").text
        streamed = http.post("/v1/completions", headers=bearer(KEY_BROKEN),
                             json={"model": "broken", "prompt": PROMPT, "max_tokens": 2, "stream": True})
        assert root not in streamed.text

        def names(key):
            rows = http.get("/v1/stats/adapters", headers=bearer(key)).json()["data"]
            assert all(root not in json.dumps(row) for row in rows)
            return {row["name"] for row in rows}

        assert names(KEY_A) <= {"alpha", "gamma"} and "alpha" in names(KEY_A)
        assert names(KEY_B) == set() and names(KEY_BROKEN) == {"broken"}
        assert {"alpha", "beta", "broken"} <= {row["name"] for row in
                                               http.get("/v1/stats/adapters", headers=bearer(API_KEY)).json()["data"]}
        stats = http.get("/v1/stats", headers=bearer(KEY_B)).json()
        assert "model" not in stats["engine"] and set(stats["running_adapters"]) <= set()
        assert "model" in http.get("/v1/stats", headers=bearer(API_KEY)).json()["engine"]
        cards = http.get("/v1/models", headers=bearer(KEY_A)).json()["data"]
        assert cards and all(card["root"] == card["id"] for card in cards)
        assert any(root in str(card["root"]) for card in
                   http.get("/v1/models", headers=bearer(API_KEY)).json()["data"])


def test_with_tenant_keys_metrics_are_the_operators(tenant_server):
    """/metrics names every tenant and adapter: with --api-keys-file it takes the admin key, as the admin routes."""
    with tenant_server.client() as http:
        for headers in ({}, bearer(KEY_A), bearer(API_KEY)):
            assert http.get("/metrics", headers=headers).status_code == 401
        assert "tenant-b" in http.get("/metrics", headers=bearer(ADMIN_KEY)).text


def test_tenant_keys_without_an_admin_key_close_the_admin_routes_to_keyless_loopback(tiny_model_dir, adapter_root,
                                                                                     keys_file):
    """Without --admin-key the admin routes answer loopback clients; with tenant keys a tenant's process on the
    host is one too, so a keyless request is refused (and with --api-key it needs that key)."""
    config = engine_config(tiny_model_dir, adapter_root)
    with live_server(config, ServerConfig(api_keys_file=keys_file, shutdown_timeout=2)) as live, live.client() as http:
        for headers in ({}, bearer(KEY_A)):
            assert http.get("/v1/adapters", headers=headers).status_code == 403
            assert http.post("/v1/unload_lora_adapter", headers=headers, json={"lora_name": "alpha"}).status_code == 403
            assert http.get("/metrics", headers=headers).status_code == 403
        assert complete(http, KEY_A, model="alpha").status_code == 200
