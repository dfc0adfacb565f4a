"""One answer from every replica's answer to an admin request (deploy/ray/admin_log.py collects them).

GET /v1/adapters          the union by (name, version); each adapter's fields are those of its hottest copy
                          (device, then host, then disk) and `replicas` lists every replica holding it with its
                          tier, pinned, in_flight and hits there.
GET /v1/adapters/{name}   the same for one adapter; 404 (the first replica's) when no replica has it.
anything else             every replica answered the same status: the first replica's answer (a change applied
                          everywhere, or refused everywhere for the same reason); statuses differ: 502 naming
                          each replica's status and message, so the operator sees where it did not apply.
Every answer carries x-swapserve-replicas: the replicas that answered.
"""
from __future__ import annotations

import json

TIERS = ("device", "host", "disk")
PER_REPLICA = ("tier", "pinned", "in_flight", "hits", "last_used")
REPLICAS_HEADER = "x-swapserve-replicas"
ONE_ADAPTER_ROUTES = ("/v1/adapters/{name}", "/v1/adapters/{name:path}")
Reply = dict  # {"status": int, "headers": [(bytes, bytes)], "body": bytes}


def combine(method: str, route: str, replies: dict[str, Reply]) -> Reply:
    if not replies:
        return _error(503, "no engine replica is running to apply this admin request; retry when /ready is 200")
    if method == "GET" and route == "/v1/adapters" and _all_ok(replies):
        entries = {r: _json(reply).get("data", []) for r, reply in replies.items()}
        return _with_replicas(_json_reply(200, {"object": "list", "data": union(entries)}), replies)
    if method == "GET" and route in ONE_ADAPTER_ROUTES and any(_ok(r) for r in replies.values()):
        entries = {r: [_json(reply)] for r, reply in replies.items() if _ok(reply)}
        return _with_replicas(_json_reply(200, union(entries)[0]), replies)
    statuses = {reply["status"] for reply in replies.values()}
    if len(statuses) == 1:
        return _with_replicas(next(iter(replies.values())), replies)
    parts = [f"{r}: {reply['status']} {_message(reply)}".rstrip() for r, reply in replies.items()]
    return _with_replicas(_error(502, "the replicas answered differently, so this change did not apply everywhere "
                                      f"(repeat it, or undo it): {'; '.join(parts)}"), replies)


def union(entries: dict[str, list[dict]]) -> list[dict]:
    """{replica: [adapter info]} -> one entry per adapter (name and content version: replicas that loaded one name
    from different files list it twice), hottest copy first, with `replicas`."""
    by_name: dict[tuple, list[tuple[str, dict]]] = {}
    for replica, infos in entries.items():
        for info in infos:
            by_name.setdefault((info.get("name"), info.get("version")), []).append((replica, info))
    out = []
    for copies in by_name.values():
        copies.sort(key=lambda c: TIERS.index(c[1].get("tier")) if c[1].get("tier") in TIERS else len(TIERS))
        hottest = dict(copies[0][1])
        hottest["replicas"] = [{"replica": r, **{k: info.get(k) for k in PER_REPLICA}} for r, info in copies]
        out.append(hottest)
    return out


def _ok(reply: Reply) -> bool:
    return 200 <= reply["status"] < 300


def _all_ok(replies: dict[str, Reply]) -> bool:
    return all(_ok(r) for r in replies.values())


def _json(reply: Reply):
    try:
        return json.loads(reply["body"] or b"{}")
    except ValueError:
        return {}


def _message(reply: Reply) -> str:
    body = _json(reply)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", ""))
    return reply["body"][:200].decode("utf-8", "replace") if not body else ""


def _json_reply(status: int, payload) -> Reply:
    return {"status": status, "headers": [(b"content-type", b"application/json")],
            "body": json.dumps(payload).encode()}


def _error(status: int, message: str) -> Reply:
    return _json_reply(status, {"error": {"message": message, "type": "replica_error", "param": None,
                                          "code": status}})


def _with_replicas(reply: Reply, replies: dict[str, Reply]) -> Reply:
    headers = [(k, v) for k, v in reply["headers"] if k.lower() not in (b"content-length", REPLICAS_HEADER.encode())]
    return {**reply, "headers": headers + [(REPLICAS_HEADER.encode(), ",".join(replies).encode())]}
