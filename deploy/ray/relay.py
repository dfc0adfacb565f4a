"""Carry one HTTP exchange across a Ray handle call as plain picklable pieces, and replay it into an ASGI app.

The ingress packs the request (`pack`), the engine replica runs it through swapserve's own FastAPI app in
process (`call_asgi`) and streams the reply back: first {"status": int, "headers": [(bytes, bytes)]}, then the
body as bytes chunks. Closing the reply stream early (the client went away) makes the app see
`http.disconnect` and cancels it, so the engine aborts the request's rows (server/api/generation.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request

log = logging.getLogger("swapserve.ray")


def pack(request: Request, body: bytes) -> dict:
    """The parts of an HTTP request the replica needs to replay it (all picklable)."""
    client = request.client
    return {"method": request.method, "path": request.url.path, "query_string": request.url.query.encode(),
            "headers": list(request.headers.raw), "body": body,
            "client": (client.host, client.port) if client else None}


def scope_of(packed: dict, state: dict | None = None) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": packed["method"], "scheme": "http", "path": packed["path"],
            "raw_path": packed["path"].encode(), "root_path": "", "query_string": packed["query_string"],
            "headers": packed["headers"], "client": packed["client"], "server": ("swapserve-replica", 0),
            "state": dict(state or {})}


async def call_asgi(app, packed: dict, state: dict | None = None) -> AsyncIterator[dict | bytes]:
    """Run `packed` through `app` (``state``: the request's request.state); yield the response start as a dict,
    then body chunks (bytes)."""
    messages: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": packed["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(scope_of(packed, state), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    finished = False
    try:
        async for item in _replies(messages):
            yield item
        finished = True
    finally:
        gone.set()
        if not finished:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await task
            except Exception:  # the app already answered 500 (ServerErrorMiddleware) or the client is gone
                log.exception("request %s %s failed", packed["method"], packed["path"])


async def collect(app, packed: dict) -> dict:
    """The whole reply of `packed`: {"status", "headers", "body"} (admin requests: small bodies)."""
    reply, body = None, bytearray()
    async for item in call_asgi(app, packed):
        if isinstance(item, dict):
            reply = item
        else:
            body += item
    return {**reply, "body": bytes(body)}


class UsageMeter:
    """request.state.usage_meter of a relayed request: server.api.tenancy adds the tokens of a tenant's request
    when it ends, and the replica reports them to the ingress after the body."""

    def __init__(self) -> None:
        self.tokens: tuple[int, int] | None = None

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens = (prompt_tokens, completion_tokens)


async def _replies(messages: asyncio.Queue) -> AsyncIterator[dict | bytes]:
    started = False
    while (message := await messages.get()) is not None:
        if message["type"] == "http.response.start":
            started = True
            yield {"status": message["status"], "headers": list(message.get("headers", []))}
        elif message["type"] == "http.response.body":
            if message.get("body"):
                yield bytes(message["body"])
            if not message.get("more_body", False):
                return
    if not started:  # the app ended without answering
        yield {"status": 500, "headers": [(b"content-type", b"text/plain; charset=utf-8")]}
        yield b"Internal Server Error"
