"""Ray Serve application: N swapserve engine replicas with adapter affinity, behind an HTTP ingress.

    serve run deploy/ray/serve_config.yaml          (from the repository root)

    client --HTTP--> SwapserveIngress --handle, multiplexed_model_id=adapter--> EngineReplica x N
                     the server's routes; reads            AsyncEngine + create_app(engine): the request runs
                     `model` (OpenAI) or                   through swapserve's own routes in process; once it
                     `parameters.adapter_id` (TGI);        succeeds the adapter is recorded with
                     tenant keys (ingress_gate.py)         @serve.multiplexed, which Ray reports to its router
                          |                                          ^
                          +-- admin routes --> AdminLog --(replicas poll)--+   every replica runs the request

Ray's router sends a request whose multiplexed model id a replica has recorded to that replica (falling back to
the replica with the fewest adapters when none has it, or when the holder is at max_ongoing_requests), so
repeated requests for one adapter find its weights already in that replica's host and device tiers. The base
model (no adapter) is routed by Ray's usual power-of-two choices. No routing logic of our own.

Admin routes (every route behind require_admin: load, unload, the adapter resource, merges, and any added later)
apply to every replica: the ingress checks the admin key, AdminLog hands the request to each replica, and the
answers are combined (fanout.py): GET /v1/adapters is the union with each replica's tier; a change answers as
the replicas did, or 502 naming each replica's answer when they differ. A replica that starts later replays the
changes in order (admin_log.py).

Tenant keys (--api-keys-file) are enforced at the ingress before a request reaches a replica (ingress_gate.py):
the key, the adapters a body names, rpm and max_concurrent for the whole deployment, tpm from the tokens each
replica reports back; each replica checks the same file again on what it serves.

Configuration: the application's `args` are `swapserve serve` flags (`max-loras: 8`, `adapter-root: [/a]`,
`lora-modules: {name: path}`, `api-keys-file: /etc/swapserve/keys.yaml`); SWAPSERVE_* environment variables work
as for the CLI (a flag wins). --host/--port are Ray's (http_options).
"""
# No `from __future__ import annotations`: FastAPI must see real classes in the route signatures of a class
# that Ray pickles by value (string annotations would be resolved against the pickled, partial globals).
import asyncio
import contextvars
import json
import logging
import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from deploy.ray.admin_log import AdminLog
from deploy.ray.fanout import combine
from deploy.ray.ingress_gate import IngressGate
from deploy.ray.relay import UsageMeter, call_asgi, collect, pack
from deploy.ray.routes import RouteTable
from server.__main__ import ENGINE_FLAGS, SERVER_FLAGS, build_configs, build_parser
from server.api import tgi
from server.api.app import create_app
from server.api.auth import PROXY_HEADERS, require_admin
from server.api.errors import error_response, swapserve_error_response
from server.api.generation import adapter_for
from server.config import valid_adapter_name
from server.errors import SwapserveError

log = logging.getLogger("swapserve.ray")
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


async def _chunks(reply, ticket=None):
    """The body chunks of a replica's reply; a dict after them carries the tokens a tenant's request used, which
    settle its ingress ticket (released with nothing charged when the reply ends without one)."""
    finished = False
    try:
        async for chunk in reply:
            if isinstance(chunk, dict):
                if ticket is not None and chunk.get("usage"):
                    ticket.finish(*chunk["usage"])
                continue
            yield chunk
        finished = True
    finally:
        if ticket is not None:
            ticket.finish(0, 0)  # a no-op once settled
        if not finished:  # the client went away: cancel the replica's request, which aborts its engine rows
            reply.cancel()


def _without_credentials(packed: dict) -> dict:
    """A packed request without its Authorization and proxy headers (what AdminLog keeps holds no key)."""
    dropped = {b"authorization", *(h.encode() for h in PROXY_HEADERS)}
    return {**packed, "headers": [(k, v) for k, v in packed["headers"] if k.lower() not in dropped]}


def _as_admin(packed: dict, server_config) -> dict:
    """An admin request from AdminLog, as this replica runs it: the ingress already checked the caller, so it
    carries this replica's own admin credentials: its --admin-key, or without one a direct loopback client (with
    the --api-key when one is set, as require_admin asks of loopback clients)."""
    packed = _without_credentials(packed)
    key = server_config.admin_key or server_config.api_key
    headers = packed["headers"] + ([(b"authorization", f"Bearer {key}".encode())] if key else [])
    return {**packed, "headers": headers, "client": ("127.0.0.1", 0)}


class _AdminCheck:
    """What require_admin reads, for the ingress's own check of an admin request."""

    def __init__(self, request: Request, server_config) -> None:
        self.headers, self.client = request.headers, request.client
        self.app = SimpleNamespace(state=SimpleNamespace(server_config=server_config))


# The admin log: one small replica (no CPU reserved) the engine replicas poll for admin requests.
AdminLogDeployment = serve.deployment(name="AdminLog", max_ongoing_requests=1024,
                                      ray_actor_options={"num_cpus": 0})(AdminLog)


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=40, health_check_period_s=10)
class EngineReplica:
    """One AsyncEngine and swapserve's FastAPI app over it; `relay` runs an HTTP request through that app, and a
    loop runs the admin requests AdminLog hands out through it too."""

    async def __init__(self, argv: list[str], admin_log):
        from server.engine.async_engine import AsyncEngine  # torch: only in engine replicas, not the ingress

        engine_config, server_config = configs(argv)
        self.engine = await asyncio.to_thread(AsyncEngine, engine_config)  # loads the model
        self.app = create_app(self.engine, server_config)
        self.server_config = server_config
        await self.app.state.lifecycle.start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._record = serve.multiplexed(max_num_models_per_replica=engine_config.max_cpu_loras)(_holds)
        self.admin_log = admin_log
        self._follower = asyncio.create_task(self._follow(), context=contextvars.Context())

    async def _follow(self) -> None:
        """Run every admin request AdminLog hands out, in order, and report each answer."""
        after = 0
        while True:
            try:
                ops = await self.admin_log.poll.remote(self.replica, after)
                for seq, op in ops:
                    reply = await collect(self.app, _as_admin(op, self.server_config))
                    await self.admin_log.ack.remote(self.replica, seq, reply)
                    after = seq
            except asyncio.CancelledError:
                raise
            except Exception:  # the log restarting, or a failed call: try again shortly
                log.exception("admin log poll failed; retrying")
                await asyncio.sleep(1.0)

    async def relay(self, packed: dict):
        """Stream the reply of `packed` (see relay.py); record its adapter here once it was served; after the
        body, {"usage": (prompt, completion)} when it was a tenant's request (the ingress charges its tpm)."""
        adapter = serve.get_multiplexed_model_id()
        meter = UsageMeter()
        async for item in call_asgi(self.app, packed, {"usage_meter": meter}):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER.encode(), self.replica.encode()))
                if adapter and item["status"] < 400:
                    # In a fresh context: Ray starts the task that reports this replica's adapters on the first
                    # call, and a task inheriting this request's context would die with a cancelled request.
                    await asyncio.create_task(self._record(adapter), context=contextvars.Context())
            yield item
        if meter.tokens is not None:
            yield {"usage": meter.tokens}

    async def check_health(self) -> None:
        if not self.engine.ready and not self.engine.draining:
            raise RuntimeError("swapserve engine step loop is not running")

    async def __del__(self):
        """Ray's graceful shutdown: drain in-flight requests for up to --shutdown-timeout, then stop the loop."""
        self._follower.cancel()
        try:
            await self.admin_log.leave.remote(self.replica)
        except Exception:  # the log may be gone first; it stops waiting for a silent replica anyway
            pass
        await self.app.state.lifecycle.stop()


ingress = FastAPI(title="swapserve (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(max_ongoing_requests=1024)
@serve.ingress(ingress)
class SwapserveIngress:
    """The server's routes in front of the engine replicas: each request goes to a replica chosen by Ray for its
    adapter; the response (JSON or SSE) streams back unchanged."""

    def __init__(self, replicas, admin_log, argv: list[str]):
        engine_config, server_config = configs(argv)
        self.replicas, self.admin_log = replicas, admin_log
        self.server_config = server_config
        self.max_body_bytes = server_config.max_body_bytes
        self.base = SimpleNamespace(model_name=engine_config.served_model_name)
        self.routes = RouteTable(engine_config, server_config)
        self.tgi_paths = {route.path for route in tgi.router.routes}
        self.gate = IngressGate(server_config, engine_config.served_model_name)

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
        body = await self._body(request)
        if body is None:
            return error_response(path, 413, f"request body exceeds --max-body-bytes ({self.max_body_bytes} bytes)")
        if route in self.routes.admin:
            return await self._fan_out(request, route, body)
        try:
            ticket = self.gate.check(request.headers, route, body) if route in self.routes.api else None
        except SwapserveError as exc:
            return swapserve_error_response(path, exc)
        adapter = self._adapter(body, route in self.tgi_paths)
        try:
            reply = self.replicas.options(stream=True, multiplexed_model_id=adapter or "").relay.remote(
                pack(request, body))
            start = await reply.__anext__()
        except BaseException:
            if ticket is not None:
                ticket.cancel()
            raise
        response = StreamingResponse(_chunks(reply, ticket), status_code=start["status"])
        response.raw_headers = start["headers"]
        return response

    async def _fan_out(self, request: Request, route: str, body: bytes) -> Response:
        """An admin request, checked here, run by every replica (AdminLog), answered as fanout.combine says."""
        try:
            await require_admin(_AdminCheck(request, self.server_config))
        except SwapserveError as exc:
            return swapserve_error_response(request.url.path, exc)
        op = _without_credentials(pack(request, body))
        replies = await self.admin_log.publish.remote(op, request.method != "GET")
        reply = combine(request.method, route, replies)
        response = Response(content=reply["body"], status_code=reply["status"])
        response.raw_headers = [*(h for h in reply["headers"] if h[0].lower() != b"content-length"),
                                (b"content-length", str(len(reply["body"])).encode())]
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
    admin_log = AdminLogDeployment.bind()
    return SwapserveIngress.bind(EngineReplica.bind(argv, admin_log), admin_log, argv)
