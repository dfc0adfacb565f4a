"""create_app(engine, server_config): the FastAPI app over an AsyncEngine (routes, limits, lifecycle).

`engine` is a built AsyncEngine, or a stand-in that builds one after start-up (server.api.serve.PendingEngine):
while its `loading` is true, /health is 200, /ready 503 {"status": "loading"}, and every API route (/v1/*,
/generate*) 503 "model is loading" in that route's error shape, before auth or body parsing.

Lifecycle: the lifespan starts the engine's step loop; `Lifecycle.stop()` (SIGTERM drain or lifespan shutdown,
whichever comes first, once) calls engine.shutdown(shutdown_timeout): new requests get 503 at once, in-flight
ones get up to the timeout to finish, the rest are aborted.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api import admin, chat, console, merge, openai, tgi, tokenize
from server.api.auth import require_metrics
from server.api.errors import error_payload, install_error_handlers
from server.api.generation import ADAPTER_VERSION_HEADER
from server.api.metrics import Metrics
from server.api.request_log import RequestLog
from server.api.settings import ServerConfig
from server.api.tenancy import Tenancy


class Lifecycle:
    """Starts the engine; stops it exactly once however many callers ask (SIGTERM, lifespan shutdown)."""

    def __init__(self, engine, shutdown_timeout: float) -> None:
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self._stopping: asyncio.Future | None = None

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.engine.shutdown(self.shutdown_timeout))
        await asyncio.shield(self._stopping)


def create_app(engine, server_config: ServerConfig | None = None) -> FastAPI:
    config = server_config or ServerConfig()
    lifecycle = Lifecycle(engine, config.shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await lifecycle.start()
        try:
            yield
        finally:
            await lifecycle.stop()

    app = FastAPI(title="swapserve", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.server_config, app.state.lifecycle = engine, config, lifecycle
    app.state.created = int(time.time())
    app.state.metrics = Metrics(engine.model_name, engine.config.max_loras)
    app.state.tenancy = Tenancy(config, app.state.metrics.registry)  # loads --api-keys-file (KeyFileError)
    engine.add_observer(app.state.metrics)
    if config.enable_log_requests:
        engine.add_observer(RequestLog(engine.model_name, app.state.tenancy.tenant_of))
    engine.add_observer(app.state.tenancy)  # after the request log, which asks it for a finished row's tenant
    install_error_handlers(app)
    for router in (openai.router, chat.router, tokenize.router, tgi.router, admin.router, merge.router):
        app.include_router(router)
    _add_probes(app)
    console.install(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(LoadingGate, engine=engine)
    app.add_middleware(RequestId)
    app.add_middleware(AdapterVersionHeader)
    return app


def _add_probes(app: FastAPI) -> None:
    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process answers. Cheap; touches nothing."""
        return Response(status_code=200)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded and warmed up and the loop runs; 503 while loading or draining.
        ``kv_cache_resident`` says whether the KV pool's pages are resident yet (on CPU a background thread makes
        them so after start; a benchmark waits for it, a client need not)."""
        engine = request.app.state.engine
        if engine.ready:
            return JSONResponse({"status": "ready", "kv_cache_resident": getattr(engine, "kv_resident", True)})
        status = ("failed" if getattr(engine, "error", None) is not None else
                  "draining" if engine.draining else "loading")
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", dependencies=[Depends(require_metrics)])
    async def metrics(request: Request) -> Response:
        state = request.app.state
        engine = getattr(state.engine, "inner", state.engine)  # a PendingEngine's, once built
        residency = engine.residency() if engine is not None and hasattr(engine, "residency") else []
        return Response(state.metrics.render(state.engine.stats(), residency), media_type=CONTENT_TYPE_LATEST)


class LoadingGate:
    """While the engine is still loading, answers API routes 503 with Retry-After and a message saying so."""

    def __init__(self, app: ASGIApp, engine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not getattr(self.engine, "loading", False) or not _is_api_path(path):
            return await self.app(scope, receive, send)
        message = (f"the model is loading ({self.engine.config.model}); retry when GET /ready returns 200")
        response = JSONResponse(error_payload(path, 503, message, "service_unavailable"), 503,
                                headers={"Retry-After": "5"})
        await response(scope, receive, send)


def _is_api_path(path: str) -> bool:
    return path.startswith(("/v1/", "/generate")) or path in TOKENIZER_PATHS


TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


class RequestId:
    """Every HTTP response carries an x-request-id: the client's own (at most 256 printable characters), else a
    new one, so a client can quote it in a report."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"x-request-id", b"")
        valid = 0 < len(given) <= 256 and given.isascii() and given.decode().isprintable()
        rid = given if valid else uuid.uuid4().hex.encode()
        if valid:  # the request's own id builds on it (server.api.generation.new_id), as vLLM's does
            scope.setdefault("state", {})["client_request_id"] = given.decode()

        async def with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, with_id)


class AdapterVersionHeader:
    """Adds x-adapter-version to the response of a request that read adapters: the route leaves the value in
    ``request.state.adapter_version`` (server.api.generation.start_generation) before the status line goes out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_version(message: Message) -> None:
            version = scope.get("state", {}).get("adapter_version")
            if message["type"] == "http.response.start" and version:
                message["headers"] = [*message.get("headers", []), (ADAPTER_VERSION_HEADER.encode(),
                                                                    version.encode())]
            await send(message)

        await self.app(scope, receive, with_version)


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413: by Content-Length up front, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body exceeds --max-body-bytes ({self.max_bytes} bytes)"

    async def _refuse(self, scope: Scope, send: Send) -> None:
        response = JSONResponse(error_payload(scope["path"], 413, self._message(), "invalid_request_error"), 413,
                                headers={"Connection": "close"})
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
