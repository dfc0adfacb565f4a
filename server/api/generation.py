"""Generation: the engine requests behind one HTTP request, and how they reach the client.

A request with P prompts and n choices runs P * n engine requests; choice i runs prompt i // n. Whatever way
the HTTP exchange ends (done, error, client gone, server shutdown), every unfinished engine request is aborted.
"""
from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.metrics import UNKNOWN_ADAPTER
from server.engine.request import RequestOutput, SamplingParams
from server.errors import AdapterError, InvalidRequestError, NotReadyError, SwapserveError, UnknownAdapterError


def new_id(prefix: str, request: Request | None = None) -> str:
    """The id of a completion (``cmpl-...``): built on the client's X-Request-Id when it sent one (vLLM's), so a
    client's id finds its rows in the request log; a random suffix keeps two requests under one id apart."""
    given = getattr(request.state, "client_request_id", None) if request is not None else None
    return f"{prefix}-{given}-{uuid.uuid4().hex[:8]}" if given else f"{prefix}-{uuid.uuid4().hex}"


def row_id(request_id: str, index: int) -> str:
    """The engine request id of job ``index`` of an HTTP request (the tenant bookkeeping follows rows by it)."""
    return f"{request_id}-{index}"


def adapter_for(engine, model: str | None) -> str | None:
    """The adapter a `model` field names: None (base model) for no name or the served model name."""
    return None if not model or model == engine.model_name else model


Mixture = list[tuple[str, float]]  # (adapter, scale) pairs: what AsyncEngine.add_request(adapters=...) reads


def adapters_for(engine, model: str | None, adapters, fields: tuple[str, str] = ("model", "adapters")) -> Mixture:
    """The (adapter, scale) pairs a request asks for: from ``adapters`` (AdapterChoice entries) when given, else
    the adapter ``model`` names at 1.0, else none (the base model). ``model`` naming an adapter while ``adapters``
    is given too is refused (400 naming both ``fields``) rather than guessed at: would it be one more component,
    at what scale, or replace the list?"""
    adapter = adapter_for(engine, model)
    if adapters is None:
        return [] if adapter is None else [(adapter, 1.0)]
    if adapter is not None:
        model_field, adapters_field = fields
        raise InvalidRequestError(
            f"`{model_field}` names the adapter {model!r} and `{adapters_field}` is given too; with "
            f"`{adapters_field}`, set `{model_field}` to the base model ({engine.model_name!r}) or omit it, and list "
            f"every adapter (with its scale) in `{adapters_field}`", param=model_field)
    return [(a.name, 1.0 if a.scale is None else a.scale) for a in adapters]


def error_labels(engine, adapters: Mixture, exc: SwapserveError) -> list[str | None]:
    """The metrics labels of a refused request: the base model (None) without adapters, else each adapter's name
    when the engine knows it. A refusal can come before names are resolved (bad prompt, full queue), and
    client-chosen names must not mint labels."""
    if not adapters:
        return [None]
    known = {a.get("name") for a in engine.list_adapters()}
    single_unknown = len(adapters) == 1 and isinstance(exc, UnknownAdapterError)
    return [name if name in known and not single_unknown else UNKNOWN_ADAPTER for name, _ in adapters]


def require_ready(engine) -> None:
    if not engine.ready:
        raise NotReadyError("server is draining" if engine.draining else "server is not ready yet")


async def encode_text(engine, text: str) -> list[int]:
    """Token ids of `text` with the tokenizer's special tokens (BOS), off the event loop (long prompts)."""
    return await run_in_threadpool(lambda: list(engine.tokenizer.encode(text)))


@dataclass
class Choice:
    """The accumulated output of one engine request."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    error_status: int = 400
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it (vLLM's)
    prompt_logprobs: list | None = None  # the engine's, with SamplingParams.prompt_logprobs (first output)

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs or []
        self.top_logprobs += out.top_logprobs or []
        self.finish_reason = out.finish_reason or self.finish_reason
        self.stop_reason = out.stop_reason if out.stop_reason is not None else self.stop_reason
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.error:
            self.error, self.error_status = out.error, out.error_status


class Generation:
    """The engine requests of one HTTP request; `abort()` is idempotent and only touches unfinished ones."""

    def __init__(self, engine, streams: list, prompts: list[list[int]] | None = None) -> None:
        self.engine = engine
        self.streams = streams
        self.prompts = prompts or []  # the prompt token ids of each engine request
        self.finished: set[int] = set()

    @classmethod
    async def start(cls, engine, jobs: list[tuple[list[int], SamplingParams]], adapters: Mixture,
                    request_id: str, user: str | None = None) -> Generation:
        """Add every job to the engine, each reading ``adapters`` (adapters_for); if one is refused, abort those
        already added and re-raise. ``user``: keeps the user on one version of a name with a traffic split."""
        streams = []
        sticky = {"user": user} if user is not None else {}
        try:
            for i, (prompt_ids, params) in enumerate(jobs):
                stream = engine.add_request(prompt_ids, params, request_id=row_id(request_id, i), adapters=adapters,
                                            **sticky)
                streams.append(await stream if inspect.isawaitable(stream) else stream)
            loaded = getattr(engine, "adapter_loaded", None)
            if loaded is not None and adapters and streams:
                await loaded(streams[0].request_id)  # a cold adapter that cannot load: 4xx, not 200 + error
        except BaseException:
            for stream in streams:
                engine.abort(stream.request_id)
            raise
        return cls(engine, streams, [p for p, _ in jobs])

    def abort(self) -> None:
        for i, stream in enumerate(self.streams):
            if i not in self.finished:
                self.engine.abort(stream.request_id)

    async def events(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output increment) as they come, all choices interleaved; aborts the rest on exit."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(self.streams)]
        try:
            while len(self.finished) < len(self.streams):
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    self.finished.add(i)
                    continue
                yield i, item
        finally:
            for task in tasks:
                task.cancel()
            self.abort()

    async def collect(self) -> list[Choice]:
        choices = [Choice(i) for i in range(len(self.streams))]
        async with aclosing(self.events()) as events:
            async for i, out in events:
                choices[i].add(out)
        return choices


async def start_generation(request: Request, jobs: list[tuple[list[int], SamplingParams]], adapters: Mixture,
                           request_id: str, adapters_field: str | None = None, user: str | None = None) -> Generation:
    """Generation.start, with a refusal counted in the metrics (per adapter) and, for a request that gave
    ``adapters_field``, an error about an adapter attributed to that field. A tenant's request is first
    authorized (every adapter it names, or the base model: 403 before any name is resolved or loaded) and
    admitted under its limits (429); server.api.tenancy settles it when its rows finish. The versions the request
    reads go out in the x-adapter-version header (adapter_version_header). ``user``: the body's ``user``, else the
    x-user-id header, makes a traffic split's choice sticky per user; without either it is drawn per HTTP request.
    A tenant's rows are salted with its name (tenant_salt), so its prefix-cache blocks are its own."""
    engine, tenancy = request.app.state.engine, request.app.state.tenancy
    tenant, ticket = getattr(request.state, "tenant", None), None
    user = user if user is not None else request.headers.get("x-user-id")
    # without a user, the request's own (random) id: every choice and prompt of one HTTP request reads one version
    sticky = user if user is not None else request_id
    try:
        tenancy.authorize(tenant, [name for name, _ in adapters], engine.model_name)
        if adapters and all(scale == 0 for _, scale in adapters):  # every component at 0 is the base model alone
            tenancy.authorize(tenant, [], engine.model_name)
        jobs = [(prompt, replace(params, cache_salt=tenant_salt(tenant.name if tenant else None, params.cache_salt)))
                for prompt, params in jobs]
        if tenant is not None:
            ticket = tenancy.admit(tenant, jobs, request_id, getattr(request.state, "usage_meter", None))
        generation = await Generation.start(engine, jobs, adapters, request_id, sticky)
    except BaseException as exc:
        if ticket is not None:
            tenancy.cancel(ticket)
        if isinstance(exc, SwapserveError):
            for label in error_labels(engine, adapters, exc):
                request.app.state.metrics.record_error(label, exc.error_type)
            if adapters_field and exc.param in ("model", "adapters"):
                exc.param = adapters_field
        raise
    versions = getattr(generation.streams[0], "versions", None) if generation.streams else None
    if versions is not None:
        request.state.adapter_version = adapter_version_header(versions)
    return generation


def tenant_salt(tenant: str | None, salt: str | None) -> str | None:
    """The prefix-cache salt of a tenant's request: its name, then the request's own cache_salt (length-prefixed,
    so no two (tenant, salt) pairs give one string). Two tenants never share a block, whatever they send: a
    cache hit shows in the time to first token and would tell one tenant what another's prompts begin with.
    Without a tenant (no keys, or the unrestricted key) the request's own salt, in a namespace of its own: a raw
    salt spelling a tenant's ("tenant:8:tenant-a:") read that tenant's blocks."""
    if tenant is None:
        return None if salt is None else f"open:{salt}"
    return f"tenant:{len(tenant)}:{tenant}:{salt or ''}"


ADAPTER_VERSION_HEADER = "x-adapter-version"


def adapter_version_header(versions: list[tuple[str, str | None]]) -> str | None:
    """The x-adapter-version value: the version for one adapter, ``name@version,...`` for a mixture; None for the
    base model (no header)."""
    if not versions:
        return None
    if len(versions) == 1:
        return versions[0][1]
    return ",".join(f"{name}@{version}" for name, version in versions)


async def _pump(index: int, stream, queue: asyncio.Queue) -> None:
    try:
        async for out in stream:
            queue.put_nowait((index, out))
        queue.put_nowait((index, None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # surfaced to the consumer of Generation.events
        queue.put_nowait((index, exc))


async def wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so receive() only reports disconnects)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_unless_disconnected(request: Request, generation: Generation) -> list[Choice] | None:
    """All choices, or None (everything aborted) when the client disconnects first."""
    work = asyncio.create_task(generation.collect())
    watcher = asyncio.create_task(wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():  # client gone first; cancel() only requests it, so `work` is not cancelled() yet
            work.cancel()
            generation.abort()
    return work.result() if work.done() and not work.cancelled() else None


def output_error(out: RequestOutput | Choice) -> SwapserveError:
    """The error of an engine request that failed after admission (``out.error``, ``out.error_status``).

    400 when the request cannot be served as asked (its adapter could not be loaded, a bad adapter under a root
    or on the Hub); 500 when the engine failed (a step raised: every request in it ends so).
    """
    if out.error_status >= 500:
        return SwapserveError(out.error)
    return AdapterError(out.error, "model")


def raise_choice_error(choices: list[Choice]) -> None:
    for choice in choices:
        if choice.error:
            raise output_error(choice)


def max_model_len(engine) -> int:
    """The engine's effective context length (--max-model-len capped by the model's positions)."""
    inner = getattr(engine, "engine", None)
    return getattr(engine, "max_model_len", None) or getattr(inner, "max_len", None) or engine.config.max_model_len


CLIENT_GONE = 499  # nginx's status for a client that closed the connection; nobody reads it


def client_gone() -> Response:
    return Response(status_code=CLIENT_GONE)


class EventStream(StreamingResponse):
    """SSE response that runs `on_close` however the stream ends (finished, client gone, server stop)."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self._on_close()


def token_text(tokenizer, token_id: int) -> str:
    """The text of one token on its own (what logprobs and TGI details show)."""
    return tokenizer.decode([token_id])


def sse(data: str) -> str:
    return f"data: {data}\n\n"
