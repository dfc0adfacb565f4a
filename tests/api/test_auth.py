"""--api-key guards inference routes, --admin-key guards admin routes; probes and metrics stay open."""
from __future__ import annotations

import openai
import pytest

from server.api.auth import is_loopback, key_matches

API_KEY, ADMIN_KEY = "sk-test-inference", "sk-test-admin"  # as set on auth_server in tests/api/conftest.py
COMPLETION = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_inference_routes_need_the_api_key(auth_server):
    with auth_server.client() as http:
        missing = http.post("/v1/completions", json=COMPLETION)
        wrong = http.post("/v1/completions", json=COMPLETION, headers=bearer("sk-wrong"))
        admin_key = http.post("/v1/completions", json=COMPLETION, headers=bearer(ADMIN_KEY))
        ok = http.post("/v1/completions", json=COMPLETION, headers=bearer(API_KEY))
        tgi = http.post("/generate", json={"inputs": "hi"})
        models = http.get("/v1/models")
    for r in (missing, wrong, admin_key, models):
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert tgi.status_code == 401 and set(tgi.json()) == {"error", "error_type"}
    assert ok.status_code == 200


def test_openai_client_with_keys(auth_server):
    with pytest.raises(openai.AuthenticationError):
        auth_server.openai("sk-wrong").models.list()
    assert auth_server.openai(API_KEY).models.list().data[0].id == "tiny-llama"


def test_admin_routes_need_the_admin_key(auth_server):
    with auth_server.client() as http:
        assert http.get("/v1/adapters").status_code == 401
        assert http.get("/v1/adapters", headers=bearer(API_KEY)).status_code == 401
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"},
                         headers=bearer(API_KEY)).status_code == 401
        assert http.get("/v1/adapters", headers=bearer(ADMIN_KEY)).status_code == 200
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "x"},
                         headers=bearer(ADMIN_KEY)).status_code == 404


def test_probes_and_metrics_are_open(auth_server):
    with auth_server.client() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").json()["status"] == "ready"
        assert http.get("/metrics").status_code == 200


def test_key_compare_and_loopback_rules():
    assert key_matches("abc", "abc") and not key_matches("abd", "abc") and not key_matches(None, "abc")
    assert key_matches("ключ", "ключ")
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(h) for h in ("10.0.0.1", "203.0.113.9", "::ffff:10.0.0.1", "localhost", "", None))


def _admin_check(host: str, token: str | None = None, api_key: str | None = None,
                 admin_key: str | None = None, api_keys_file: str | None = None) -> int:
    """Status require_admin gives a client at `host` (200 when it passes)."""
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request

    from server.api.auth import require_admin
    from server.api.settings import ServerConfig
    from server.errors import SwapserveError

    config = ServerConfig(api_key=api_key, admin_key=admin_key, api_keys_file=api_keys_file)
    app = SimpleNamespace(state=SimpleNamespace(server_config=config))
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    request = Request({"type": "http", "headers": headers, "client": (host, 40000), "app": app})
    try:
        asyncio.run(require_admin(request))
    except SwapserveError as exc:
        return exc.status_code
    return 200


def test_admin_rules_for_each_key_combination():
    assert _admin_check("127.0.0.1") == 200 and _admin_check("10.1.2.3") == 403
    assert _admin_check("127.0.0.1", api_key="k") == 401 and _admin_check("127.0.0.1", "k", api_key="k") == 200
    assert _admin_check("10.1.2.3", "k", api_key="k") == 403  # the api key does not open admin to remote clients
    assert _admin_check("10.1.2.3", "a", admin_key="a") == 200 and _admin_check("127.0.0.1", admin_key="a") == 401
    # tenant keys: a tenant's process on the host is loopback too; only the unrestricted key (or the admin key) opens
    assert _admin_check("127.0.0.1", api_keys_file="keys.json") == 403
    assert _admin_check("127.0.0.1", "k", api_key="k", api_keys_file="keys.json") == 200
