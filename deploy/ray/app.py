"""Ray Serve application: N swapserve engine replicas with adapter affinity, behind an HTTP ingress.

    serve run deploy/ray/serve_config.yaml          (from the repository root)

    client --HTTP--> SwapserveIngress --handle, multiplexed_model_id=adapter--> EngineReplica x N
                     the server's routes; reads            AsyncEngine + create_app(engine): the request runs
                     `model` (OpenAI) or                   through swapserve's own routes in process; once it
                     `parameters.adapter_id` (TGI)         succeeds the adapter is recorded with
                                                           @serve.multiplexed, which Ray reports to its router

Ray's router sends a request whose multiplexed model id a replica has recorded to that replica (falling back to
the replica with the fewest adapters when none has it, or when the holder is at max_ongoing_requests), so
repeated requests for one adapter find its weights already in that replica's host and device tiers. The base
model (no adapter) is routed by Ray's usual power-of-two choices. No routing logic of our own.

Configuration: the application's `args` are `swapserve serve` flags (`max-loras: 8`, `adapter-root: [/a]`,
`lora-modules: {name: path}`); SWAPSERVE_* environment variables work as for the CLI (a flag wins).
--host/--port are Ray's (http_options); admin routes are per replica state and are refused here: adapters load
on demand from --adapter-root, or are pinned at start with --lora-modules.
"""
# No `from __future__ import annotations`: FastAPI must see real classes in the route signatures of a class
# that Ray pickles by value (string annotations would be resolved against the pickled, partial globals).
import asyncio
import contextvars
import json
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from starlette.routing import compile_path

from deploy.ray.relay import call_asgi, pack
from server.__main__ import ENGINE_FLAGS, SERVER_FLAGS, build_configs, build_parser
from server.api import admin, tgi
from server.api.app import create_app
from server.api.errors import error_response
from server.api.generation import adapter_for
from server.config import valid_adapter_name

REPLICA_HEADER = "x-swapserve-replica"  # which engine replica answered (for operators and the affinity test)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def flags_to_argv(args: Mapping[str, Any]) -> list[str]:
    """`swapserve serve` argv from the application's args ({"max-loras": 8, "adapter-root": ["/a"], ...})."""
    known = {f.name: f for f in ENGINE_FLAGS + SERVER_FLAGS}
    argv = ["serve"]
    for key, value in args.items():
        name = key.replace("_", "-")
        flag = known.get(name)
        if flag is None:
            raise ValueError(f"deploy/ray: {key!r} is not a `swapserve serve` flag; known: {', '.join(known)}")
        if flag.type is bool:
            argv += [f"--{name}"] if value else []
        elif flag.type is list:
            items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, Mapping) else \
                [value] if isinstance(value, str) else list(value)
            argv += [f"--{name}", *map(str, items)] if items else []
        elif value is not None:
            argv += [f"--{name}", str(value)]
    return argv


def configs(argv: list[str]):
    """(EngineConfig, ServerConfig) exactly as `swapserve serve <argv>` would build them."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise ValueError(f"deploy/ray: invalid swapserve flags {argv[1:]}") from None
    return build_configs(args, dict(os.environ))


# Helpers come before the deployments: Ray pickles a deployment class by value when it is declared, with the
# module globals that exist at that moment.
async def _holds(adapter: str) -> str:
    """Ray's multiplexed 'model' is only the record that this replica served `adapter`: the engine itself loads
    and evicts weights (AdapterStore host tier, AdapterManager slots); Ray's LRU is sized like the host tier."""
    return adapter


async def _chunks(reply):
    finished = False
    try:
        async for chunk in reply:
            yield chunk
        finished = True
    finally:
        if not finished:  # the client went away: cancel the replica's request, which aborts its engine rows
            reply.cancel()


class _NoEngine:
    """Just enough of an engine for create_app() to build its routes; never started."""

    def __init__(self, engine_config):
        self.config = engine_config
        self.model_name = engine_config.served_model_name

    def add_observer(self, observer) -> None:
        pass


class RouteTable:
    """The paths create_app() serves, read from its OpenAPI schema (stable across FastAPI's router internals)."""

    def __init__(self, engine_config, server_config):
        app = create_app(_NoEngine(engine_config), server_config)
        self.paths = [(compile_path(path)[0], path) for path in app.openapi()["paths"]]

    def match(self, path: str) -> str | None:
        """The route template `path` falls under (e.g. /v1/adapters/{name}), or None."""
        return next((template for regex, template in self.paths if regex.match(path)), None)


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=40, health_check_period_s=10)
class EngineReplica:
    """One AsyncEngine and swapserve's FastAPI app over it; `relay` runs an HTTP request through that app."""

    async def __init__(self, argv: list[str]):
        from server.engine.async_engine import AsyncEngine  # torch: only in engine replicas, not the ingress

        engine_config, server_config = configs(argv)
        self.engine = await asyncio.to_thread(AsyncEngine, engine_config)  # loads the model
        self.app = create_app(self.engine, server_config)
        await self.app.state.lifecycle.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._record = serve.multiplexed(max_num_models_per_replica=engine_config.max_cpu_loras)(_holds)

    async def relay(self, packed: dict):
        """Stream the reply of `packed` (see relay.py); record its adapter here once it was served."""
        adapter = serve.get_multiplexed_model_id()
        async for item in call_asgi(self.app, packed):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER.encode(), self.replica.encode()))
                if adapter and item["status"] < 400:
                    # In a fresh context: Ray starts the task that reports this replica's adapters on the first
                    # call, and a task inheriting this request's context would die with a cancelled request.
                    await asyncio.create_task(self._record(adapter), context=contextvars.Context())
            yield item

    async def check_health(self) -> None:
        if not self.engine.ready and not self.engine.draining:
            raise RuntimeError("swapserve engine step loop is not running")

    async def __del__(self):
        """Ray's graceful shutdown: drain in-flight requests for up to --shutdown-timeout, then stop the loop."""
        await self.app.state.lifecycle.stop()


ingress = FastAPI(title="swapserve (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(ingress)
class SwapserveIngress:
    """The server's routes in front of the engine replicas: each request goes to a replica chosen by Ray for its
    adapter; the response (JSON or SSE) streams back unchanged."""

    def __init__(self, replicas, argv: list[str]):
        engine_config, server_config = configs(argv)
        self.replicas = replicas
        self.max_body_bytes = server_config.max_body_bytes
        self.base = SimpleNamespace(model_name=engine_config.served_model_name)
        self.routes = RouteTable(engine_config, server_config)
        self.admin_paths = {route.path for route in admin.router.routes}
        self.tgi_paths = {route.path for route in tgi.router.routes}

    @ingress.get("/health")
    async def health(self) -> Response:
        """Liveness of the ingress itself; /ready answers from an engine replica."""
        return Response(status_code=200)

    @ingress.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request) -> Response:
        path = request.url.path
        route = self.routes.match(path)
        if route is None:
            return error_response(path, 404, f"no route {path}")
        if route in self.admin_paths:
            return error_response(path, 501, "admin routes change one replica only and are off behind Ray Serve; "
                                  "use --adapter-root (loaded on demand) or --lora-modules (pinned at start)")
        body = await self._body(request)
        if body is None:
            return error_response(path, 413, f"request body exceeds --max-body-bytes ({self.max_body_bytes} bytes)")
        adapter = self._adapter(body, route in self.tgi_paths)
        reply = self.replicas.options(stream=True, multiplexed_model_id=adapter or "").relay.remote(
            pack(request, body))
        start = await reply.__anext__()
        response = StreamingResponse(_chunks(reply), status_code=start["status"])
        response.raw_headers = start["headers"]
        return response

    async def _body(self, request: Request) -> bytes | None:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                return None
        return bytes(body)

    def _adapter(self, body: bytes, tgi_route: bool) -> str | None:
        """The adapter the request names (None: the base model, or nothing usable; the replica reports errors)."""
        try:
            fields = json.loads(body) if body else {}
            name = (fields.get("parameters") or {}).get("adapter_id") if tgi_route else fields.get("model")
        except (ValueError, AttributeError):
            return None
        name = adapter_for(self.base, name) if isinstance(name, str) else None
        return name if name and valid_adapter_name(name) else None


def build_app(args: dict[str, Any]):
    """Application builder for `serve run` / serve_config.yaml: `args` are `swapserve serve` flags."""
    argv = flags_to_argv(args or {})
    configs(argv)  # fail the deploy early, with the flag's own message, when the flags are invalid
    return SwapserveIngress.bind(EngineReplica.bind(argv), argv)
