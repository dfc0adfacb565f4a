"""The pieces of deploy/ray that need no cluster: AdminLog (every live replica answers, later ones replay the
changes), fanout.combine (the union of /v1/adapters, disagreement as 502), IngressGate (tenant keys at the
ingress) and the usage a replica reports for a tenant's request."""
from __future__ import annotations

import asyncio
import json

import pytest

from server.api.settings import ServerConfig
from server.errors import SwapserveError
from .helpers import deploy_module

AdminLog = deploy_module("ray/admin_log.py").AdminLog
combine, union = deploy_module("ray/fanout.py").combine, deploy_module("ray/fanout.py").union
IngressGate = deploy_module("ray/ingress_gate.py").IngressGate
UsageMeter, call_asgi = deploy_module("ray/relay.py").UsageMeter, deploy_module("ray/relay.py").call_asgi

LOAD = {"method": "POST", "path": "/v1/load_lora_adapter", "body": b"{}"}
READ = {"method": "GET", "path": "/v1/adapters", "body": b""}


def reply(status: int, payload) -> dict:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return {"status": status, "headers": [(b"content-type", b"application/json")], "body": body}


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def follower(log: AdminLog, replica: str, answer, applied: list, stop: asyncio.Event) -> None:
    """What EngineReplica._follow does, with `answer(op)` for the replica's app."""
    after = 0
    while not stop.is_set():
        for seq, op in await log.poll(replica, after):
            applied.append((replica, seq, op["method"]))
            await log.ack(replica, seq, answer(op))
            after = seq


def test_every_live_replica_runs_a_change_and_a_late_replica_replays_changes_only():
    async def scenario():
        log, stop = AdminLog(poll_s=0.05), asyncio.Event()
        applied: list = []
        ok = lambda op: reply(200, {"ok": op["method"]})  # noqa: E731
        tasks = [asyncio.create_task(follower(log, r, ok, applied, stop)) for r in ("r1", "r2")]
        await asyncio.sleep(0.01)
        assert log.live() == ["r1", "r2"]
        changed = await log.publish(LOAD, record=True, timeout=5)
        read = await log.publish(READ, record=False, timeout=5)
        assert set(changed) == set(read) == {"r1", "r2"} and changed["r1"]["status"] == 200
        tasks.append(asyncio.create_task(follower(log, "r3", ok, applied, stop)))  # scale-up: replays the load
        await asyncio.sleep(0.2)
        assert [(seq, m) for r, seq, m in applied if r == "r3"] == [(1, "POST")]
        third = await log.publish({**LOAD, "method": "DELETE"}, record=True, timeout=5)
        assert set(third) == {"r1", "r2", "r3"}
        stop.set()
        await asyncio.gather(*tasks)
    asyncio.run(scenario())


def test_a_replica_that_stops_polling_is_reported_not_waited_for_forever():
    async def scenario():
        clock = Clock()
        log, stop = AdminLog(poll_s=0.05, live_s=30, clock=clock), asyncio.Event()
        task = asyncio.create_task(follower(log, "r1", lambda op: reply(200, {}), [], stop))
        await log.poll("gone", 0)  # seen once, then silent
        replies = await log.publish(LOAD, record=True, timeout=0.3)
        assert replies["r1"]["status"] == 200 and replies["gone"]["status"] == 504
        clock.now += 31  # now it has been silent for longer than live_s: not waited for at all
        await asyncio.sleep(0.1)  # r1 polls again meanwhile
        assert set(await log.publish(LOAD, record=True, timeout=5)) == {"r1"}
        stop.set()
        await task
        log.leave("r1")
        assert log.live() == [] and await log.publish(READ, record=False, timeout=0.1) == {}
    asyncio.run(scenario())


def info(name, tier, pinned=False, in_flight=0) -> dict:
    return {"name": name, "tier": tier, "pinned": pinned, "in_flight": in_flight, "hits": 1, "last_used": 0.0,
            "source": f"/a/{name}", "version": "v"}


def test_the_adapter_list_is_the_union_with_each_replicas_tier():
    replies = {"r1": reply(200, {"object": "list", "data": [info("a", "host"), info("b", "device")]}),
               "r2": reply(200, {"object": "list", "data": [info("a", "device", in_flight=2)]})}
    out = combine("GET", "/v1/adapters", replies)
    data = {e["name"]: e for e in json.loads(out["body"])["data"]}
    assert out["status"] == 200 and dict(out["headers"])[b"x-swapserve-replicas"] == b"r1,r2"
    assert data["a"]["tier"] == "device" and data["a"]["in_flight"] == 2  # the hottest copy's fields
    assert [(r["replica"], r["tier"], r["in_flight"]) for r in data["a"]["replicas"]] == [("r2", "device", 2),
                                                                                         ("r1", "host", 0)]
    assert [r["replica"] for r in data["b"]["replicas"]] == ["r1"]
    one = combine("GET", "/v1/adapters/{name}", {"r1": reply(404, {"error": {"message": "no"}}),
                                                 "r2": reply(200, info("a", "host"))})
    assert one["status"] == 200 and json.loads(one["body"])["replicas"][0]["replica"] == "r2"
    none = combine("GET", "/v1/adapters/{name}", {"r1": reply(404, {"error": {"message": "no"}})})
    assert none["status"] == 404
    assert union({}) == []


def test_a_change_answers_as_the_replicas_did_or_502_when_they_differ():
    same = combine("POST", "/v1/load_lora_adapter", {"r1": reply(200, b"Success"), "r2": reply(200, b"Success")})
    assert same["status"] == 200 and same["body"] == b"Success"
    refused = {r: reply(400, {"error": {"message": "bad adapter"}}) for r in ("r1", "r2")}
    assert combine("POST", "/v1/load_lora_adapter", refused)["status"] == 400
    split = combine("POST", "/v1/load_lora_adapter", {"r1": reply(200, b"Success"),
                                                      "r2": reply(503, {"error": {"message": "no room"}})})
    message = json.loads(split["body"])["error"]["message"]
    assert split["status"] == 502 and "r1: 200 Success" in message and "r2: 503 no room" in message
    assert combine("DELETE", "/v1/adapters/{name}", {})["status"] == 503  # no replica running


def test_the_ingress_gate_checks_keys_names_and_limits(tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"key": "sk-t-0001", "name": "t", "adapters": ["a*"], "rpm": 2},
                                {"key": "sk-c-0002", "name": "c", "base_model": True, "max_concurrent": 1}]))
    gate = IngressGate(ServerConfig(api_key="sk-all-0000", api_keys_file=str(keys)), "base")

    def status(key, route, body) -> int:
        try:
            gate.check({"authorization": f"Bearer {key}"}, route, json.dumps(body).encode())
        except SwapserveError as exc:
            return exc.status_code
        return 200

    assert status("sk-nope", "/v1/completions", {"model": "a1"}) == 401
    assert status("sk-all-0000", "/v1/completions", {"model": "zzz"}) == 200  # unrestricted
    assert status("sk-t-0001", "/v1/completions", {"model": "base"}) == 403
    assert status("sk-t-0001", "/v1/completions", {"adapters": [{"name": "a1"}, {"name": "b"}]}) == 403
    assert status("sk-t-0001", "/generate", {"inputs": "x", "parameters": {"adapter_id": "b"}}) == 403
    assert status("sk-t-0001", "/tokenize", {"model": "b", "prompt": "x"}) == 403
    assert status("sk-t-0001", "/tokenize", {"prompt": "x"}) == 200
    assert status("sk-t-0001", "/v1/models", {}) == 200  # listed per key by the replica
    assert status("sk-t-0001", "/v1/completions", {"model": "a1"}) == 200
    assert status("sk-t-0001", "/generate", {"inputs": "x", "parameters": {"adapter_id": "a2@v1"}}) == 200
    assert status("sk-t-0001", "/v1/completions", {"model": "a1"}) == 429  # rpm 2, across the deployment
    ticket = gate.check({"authorization": "Bearer sk-c-0002"}, "/v1/completions", b"{}")
    assert status("sk-c-0002", "/v1/completions", {}) == 429
    ticket.finish(3, 4)
    assert status("sk-c-0002", "/v1/completions", {}) == 200


@pytest.fixture(scope="module")
def tenant_app(tiny_model_dir, tmp_path_factory):
    from api.conftest import engine_config, live_server

    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps([{"key": "sk-t-0001", "name": "t", "base_model": True}]))
    with live_server(engine_config(tiny_model_dir), ServerConfig(api_keys_file=str(keys))) as live:
        yield live


def test_a_replica_reports_the_tokens_of_a_tenants_request(tenant_app):
    async def relay(key: str) -> tuple[int, UsageMeter]:
        packed = {"method": "POST", "path": "/v1/completions", "query_string": b"",
                  "headers": [(b"content-type", b"application/json"), (b"authorization", f"Bearer {key}".encode())],
                  "body": json.dumps({"prompt": [1, 40, 41], "max_tokens": 4, "ignore_eos": True}).encode(),
                  "client": ("127.0.0.1", 1)}
        meter, status = UsageMeter(), None
        async for item in call_asgi(tenant_app.app, packed, {"usage_meter": meter}):
            status = item["status"] if isinstance(item, dict) else status
        return status, meter

    async def both():
        return await relay("sk-t-0001"), await relay("sk-nope")

    future = asyncio.run_coroutine_threadsafe(both(), tenant_app.engine._loop)
    (status, meter), (refused, unused) = future.result(60)
    assert status == 200 and meter.tokens == (3, 4)
    assert refused == 401 and unused.tokens is None


def test_one_name_with_different_content_on_two_replicas_is_listed_twice():
    a1, a2 = {**info("a", "host"), "version": "111"}, {**info("a", "device"), "version": "222"}
    merged = union({"r1": [a1], "r2": [a2]})
    assert sorted((e["version"], [r["replica"] for r in e["replicas"]]) for e in merged) == [("111", ["r1"]),
                                                                                            ("222", ["r2"])]
