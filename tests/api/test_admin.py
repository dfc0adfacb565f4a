"""Admin routes (vLLM's runtime LoRA endpoints and /v1/adapters) over the real server, loopback, no admin key."""
from __future__ import annotations

import pytest


def greedy(http, model: str) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": "hello world", "max_tokens": 6,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def model_ids(http) -> dict:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}


def test_vllm_load_and_unload_lora_adapter(server, adapter_root):
    with server.client() as http:
        load = {"lora_name": "dyn-one", "lora_path": str(adapter_root / "beta")}
        r = http.post("/v1/load_lora_adapter", json=load)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'dyn-one' added successfully."
        assert model_ids(http)["dyn-one"]["parent"] == "tiny-llama"
        assert greedy(http, "dyn-one") == greedy(http, "beta")
        again = http.post("/v1/load_lora_adapter", json=load)
        assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
        inplace = http.post("/v1/load_lora_adapter", json={**load, "lora_path": str(adapter_root / "alpha"),
                                                           "load_inplace": True})
        assert inplace.status_code == 200
        assert greedy(http, "dyn-one") == greedy(http, "alpha")
        r = http.post("/v1/unload_lora_adapter", json={"lora_name": "dyn-one"})
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'dyn-one' removed successfully."
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "dyn-one"})
        assert gone.status_code == 404 and gone.json()["error"]["code"] == 404
        assert "dyn-one" not in model_ids(http)
        assert http.post("/v1/completions", json={"model": "dyn-one", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize("body, status", [
    ({"lora_name": "x"}, 400),
    ({"lora_path": "/tmp"}, 400),
    ({"lora_name": "../evil", "lora_path": "/tmp"}, 400),
    ({"lora_name": "has space", "lora_path": "/tmp"}, 400),
    ({"lora_name": "evil\n", "lora_path": "alpha"}, 400),  # '$' let a final newline through (log injection)
    ({"lora_name": "tiny-llama", "lora_path": "/tmp"}, 400),
])
def test_load_lora_adapter_refuses_bad_requests(server, body, status):
    with server.client() as http:
        r = http.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_load_refuses_paths_outside_the_adapter_roots(server, adapter_root, tiny_model_dir):
    with server.client() as http:
        for path in (str(tiny_model_dir), str(adapter_root / ".." / "elsewhere"), "/etc"):
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "outside", "lora_path": path})
            assert r.status_code in (400, 403), (path, r.text)
        assert "outside" not in model_ids(http)


def test_adapters_resource(server, adapter_root):
    with server.client() as http:
        listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
        fields = {"name", "type", "rank", "size_bytes", "tier", "pinned", "in_flight", "hits", "last_used"}
        assert fields <= set(listed["preloaded"])
        created = http.post("/v1/adapters", json={"name": "dyn-two", "source": str(adapter_root / "beta"),
                                                  "pinned": True})
        assert created.status_code == 201 and created.json()["name"] == "dyn-two"
        assert {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}["dyn-two"]["pinned"] is True
        conflict = http.post("/v1/adapters", json={"name": "dyn-two", "source": str(adapter_root / "beta")})
        assert conflict.status_code == 409
        deleted = http.delete("/v1/adapters/dyn-two")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert http.delete("/v1/adapters/dyn-two").status_code == 404


def test_admin_refuses_non_loopback_clients_without_admin_key(server):
    """uvicorn trusts X-Forwarded-For from 127.0.0.1 (a local proxy), so this client is seen as remote."""
    with server.client(headers={"X-Forwarded-For": "203.0.113.9"}) as http:
        assert http.get("/v1/adapters").status_code == 403
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "remote", "lora_path": "/tmp"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        assert http.get("/v1/models").status_code == 200  # inference routes are not admin routes


@pytest.mark.parametrize("headers", [{"X-Real-IP": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9;proto=https"},
                                     {"X-Forwarded-For": "127.0.0.1"}, {"X-Forwarded-Proto": "https"}],
                         ids=["x-real-ip", "forwarded", "x-forwarded-for-loopback", "x-forwarded-proto"])
def test_admin_without_key_refuses_requests_through_a_proxy(server, headers):
    """Behind a reverse proxy on the same host every client connects from loopback; a request that carries a
    proxy header is refused, saying how to set --admin-key, even when the address it claims is loopback."""
    with server.client(headers=headers) as http:
        r = http.get("/v1/adapters")
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        message = r.json()["error"]["message"]
        assert "came through a proxy" in message and "--admin-key (or SWAPSERVE_ADMIN_KEY)" in message
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "preloaded"}).status_code == 403
        assert http.get("/v1/models").status_code == 200  # inference routes do not care
    with server.client() as http:
        assert http.get("/v1/adapters").status_code == 200  # a direct loopback client still passes


def test_get_one_adapter_and_why_an_on_demand_load_failed(server):
    """A name whose on-demand load failed is listed nowhere, but GET /v1/adapters/{name} says why (404)."""
    with server.client() as http:
        one = http.get("/v1/adapters/preloaded")
        assert one.status_code == 200 and one.json()["name"] == "preloaded" and one.json()["pinned"] is True
        missing = http.get("/v1/adapters/never-heard-of")
        assert missing.status_code == 404 and "cannot be found" in missing.json()["error"]["message"]
        failed = http.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
        assert failed.status_code == 400 and "not valid JSON" in failed.json()["error"]["message"]
        assert "broken" not in model_ids(http)
        assert "broken" not in {a["name"] for a in http.get("/v1/adapters").json()["data"]}
        why = http.get("/v1/adapters/broken")
        assert why.status_code == 404
        message = why.json()["error"]["message"]
        assert "is not loaded: its on-demand load from" in message and "broken" in message
        assert "(answered 400)" in message and "adapter_config.json: not valid JSON" in message
        assert http.get("/v1/adapters/org/repo@main").status_code == 404  # a Hub id's '/' reaches the route


def test_get_one_adapter_refuses_names_longer_than_any_adapter(server):
    with server.client() as http:
        r = http.get("/v1/adapters/" + "a" * 263)
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/load_lora_adapter", {"lora_name": "strict-a", "lora_path": "alpha", "lora_int_id": 3}),
    ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha", "force": True}),
    ("POST", "/v1/adapters", {"name": "strict-b", "source": "alpha", "pin": True}),
    ("PUT", "/v1/adapters/strict-c", {"source": "alpha", "replace": True}),
])
def test_admin_bodies_refuse_fields_they_do_not_implement(server, adapter_root, method, path, body):
    """A field an admin route does not read is a 400 naming it, never a plausible 200 that did something else
    (`pin` for `pinned`); nothing is loaded or unloaded by the refused request."""
    body = {k: (str(adapter_root / v) if k in ("lora_path", "source") else v) for k, v in body.items()}
    with server.client() as http:
        before = set(model_ids(http))
        r = http.request(method, path, json=body)
        assert r.status_code == 400, r.text
        unknown = next(k for k in body if k in ("lora_int_id", "force", "pin", "replace"))
        assert r.json()["error"]["param"] == unknown and "not supported" in r.json()["error"]["message"], r.json()
        assert set(model_ids(http)) == before


def test_an_on_demand_hub_adapter_can_be_unloaded_by_its_id(tiny_model_dir, adapter_root):
    """On-demand Hub adapters are registered under their id ("org/repo"): both unload routes take it (they
    refused any '/' and the DELETE route did not match it). The registration is made as resolve() makes it; its
    download would need the network."""
    from server.adapters.catalog import AdapterEntry
    from .conftest import engine_config, live_server

    config = engine_config(tiny_model_dir, adapter_root, allow_hub_adapters=True, hub_adapter_orgs=["org"])
    with live_server(config) as live, live.client() as http:
        store = live.engine.engine.store
        for name, unload in (("org/one", lambda n: http.delete(f"/v1/adapters/{n}")),
                             ("org/two", lambda n: http.post("/v1/unload_lora_adapter", json={"lora_name": n}))):
            with store.lock:
                store.catalog.add(AdapterEntry(name, f"hub:{name}", on_demand=True))
            assert http.get(f"/v1/adapters/{name}").status_code == 200
            assert unload(name).status_code == 200
            assert name not in store.entries
