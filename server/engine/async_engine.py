"""AsyncEngine: the LLMEngine step loop on a background thread, per-request asyncio queues in front.

The event loop thread validates and enqueues; the step thread owns the scheduler, the slots and the KV
cache. They meet only in ``_inbox`` (a lock-guarded list of callables run by the step thread between steps)
and in ``loop.call_soon_threadsafe`` for outputs.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import math
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable

from server.adapters.disk_listing import describe_dir, disk_adapters
from server.adapters.merge import AdapterMerger
from server.adapters.merge_spec import MergeSpec
from server.config import EngineConfig
from server.engine.engine import LLMEngine
from server.engine.request import MAX_SCALE, AdapterUse, Request, RequestOutput, SamplingParams, mixture_error
from server.errors import (AdapterError, InvalidRequestError, NotReadyError, QueueFullError, SwapserveError,
                           UnknownAdapterError)

log = logging.getLogger(__name__)
SWITCH_INTERVAL_S = 0.0005
_frozen = 0  # started engines that want the heap frozen
_frozen_lock = threading.Lock()


def _freeze_heap(on: bool) -> None:
    """The first engine to start freezes the heap (see AsyncEngine.start); the last to stop thaws it, since
    what was frozen may be garbage now and the program (an embedding one, a test run) goes on."""
    global _frozen
    with _frozen_lock:
        _frozen += 1 if on else -1
        if on:
            gc.collect()  # later engines freeze what the earlier ones did not see
            gc.freeze()
        elif _frozen == 0:
            gc.unfreeze()


class RequestStream:
    """Async iterator over one request's RequestOutput increments; closing it early aborts the request."""

    def __init__(self, request_id: str, engine: "AsyncEngine", uses: tuple[AdapterUse, ...] = ()):
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._engine = engine
        self._uses = uses
        self._done = False

    @property
    def versions(self) -> list[tuple[str, str | None]]:
        """(adapter name, version) of each adapter the request reads; a version is None until its adapter has been
        read (await engine.adapter_loaded first). Kept here, not looked up: the request may be done already."""
        return [(u.entry.name, u.entry.version) for u in self._uses]

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self.queue.get()
        except asyncio.CancelledError:
            self._engine.abort(self.request_id)
            raise
        self._done = out.finished
        return out


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.observers: list = []
        t0 = time.perf_counter()
        self.engine = LLMEngine(config, self.observers)
        self.tokenizer = self.engine.tokenizer
        self.sampling_defaults = self.engine.sampling_defaults  # generation_config.json's, for omitted fields
        self.grammar = self.engine.grammar  # GrammarCompiler: compile(GrammarSpec) -> SamplingParams.grammar
        self.model_name = config.served_model_name
        self.load_seconds = time.perf_counter() - t0
        self.draining = False
        self._requests: dict[str, tuple[Request, RequestStream]] = {}
        self._inbox: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._wake_queued = False  # a wake-up is queued on the event loop (see _submit)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._heap_frozen = False
        self.merger = AdapterMerger(self.engine.store, self.engine.runner.model.config,
                                    Path(config.adapters_cache) / "merged", config.max_adapter_bytes)
        self.observers.append(self.merger)  # it deletes the files of merged versions forgotten on eviction
        for name, path in config.lora_modules.items():  # operator-given: trusted paths, pinned
            entry = self.engine.store.register(name, str(path), pinned=True, trusted=True)
            self.engine.store.ensure_host(entry).result()
        self._warmup()

    # ---- lifecycle --------------------------------------------------------------------------------------
    @property
    def kv_resident(self) -> bool:
        """True once the KV pool's pages are resident: on CPU a background thread populates them after start
        (host_memory.populate_in_background); requests are served meanwhile, their first writes page faulting."""
        return self.engine.runner.kv_resident.is_set()

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.draining

    def add_observer(self, obs) -> None:
        self.observers.append(obs)

    async def start(self) -> None:
        # The step thread drops and retakes the GIL around every torch op; with Python's default 5 ms switch
        # interval, an adapter load on another thread made it wait up to 5 ms each time (ITL p99 +93..132%
        # while 10 adapters loaded in the benchmark; +30..83% over repeated noisy runs at 0.5 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        # Take the start-up heap (model, tokenizer, libraries: ~1M objects) out of the collector's reach, as
        # vLLM's engine core, SGLang and TensorRT-LLM do. Each load creates objects that live on in the host
        # tier, which sets off gen-2 collections; each walked the whole heap for 30-100 ms holding the GIL
        # on the loader thread, while the step thread waited (measured: 330 ms of gen-2 collections per
        # 12 bursts of 10 loads, step time during loads +18%; frozen: none, +10%).
        if not self._heap_frozen:
            _freeze_heap(True)
            self._heap_frozen = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; wait up to ``timeout`` s for in-flight requests; abort the rest; stop the loop."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self._requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self._requests):
            self.abort(rid)
        while self._requests and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        if self._thread:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)
        try:
            self.merger.close()
            self.engine.store.close()
        finally:
            if self._heap_frozen:
                _freeze_heap(False)
                self._heap_frozen = False

    def _warmup(self) -> None:
        """One short request through the whole step (scheduler, blocks, forward, sampler) before the port says
        ready; it leaves nothing behind (its 4 tokens fill no block, so the prefix cache stays empty)."""
        eng = self.engine
        req = Request("warmup", [eng.tokenizer.eos_token_id or 0] * 4, SamplingParams(max_tokens=1, temperature=0))
        eng.scheduler.add(req)
        while eng.scheduler.has_work:
            eng.step()

    # ---- the step thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                todo, self._inbox = self._inbox, []
            for fn in todo:
                fn()
            if not self.engine.scheduler.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step must not kill the server: fail its requests, keep going
                log.exception("engine step failed")
                outputs = self.engine.fail_all(f"internal error in an engine step ({type(exc).__name__}: {exc}); "
                                               "every request in it was ended, the server keeps serving (please "
                                               "report this)")
            try:
                for req, out in outputs:
                    self._loop.call_soon_threadsafe(self._deliver, req.request_id, out)
            except RuntimeError:  # the event loop is closed (a forced exit: a second Ctrl-C): nobody to tell
                log.info("the event loop has closed: the step loop stops")
                return
            if not outputs and self.engine.scheduler.has_work:
                time.sleep(0.002)  # only waiting requests whose adapters are loading: do not spin

    def _submit(self, fn: Callable[[], None]) -> None:
        """Hand ``fn`` to the step thread. From the event loop, the wake-up waits for the loop's next turn, so
        everything submitted in this turn (a client's 32 requests sent at once) starts in one step: woken at the
        first, an idle step thread took the GIL within the 0.5 ms switch interval and ran a step for the first
        request or few alone, and the rest waited for it (one extra step, ~3% of a 32 x 32-token batch)."""
        with self._lock:
            self._inbox.append(fn)
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() != self._loop_thread:
            self._wake.set()
        elif not self._wake_queued:
            self._wake_queued = True
            loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_queued = False
        self._wake.set()

    def _deliver(self, request_id: str, out: RequestOutput) -> None:
        item = self._requests.get(request_id)
        if item is None:
            return
        item[1].queue.put_nowait(out)
        if out.finished:
            del self._requests[request_id]

    # ---- requests ---------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                    request_id: str | None = None, adapters: list[tuple[str, float]] | None = None,
                    user: str | None = None) -> RequestStream:
        """``adapter``: one adapter by name (None or the served model name: the base model), ``name@version`` for
        one of its versions. ``adapters``: instead, a mixture [(name, scale), ...], or one adapter at a strength
        (see mixture rules in _mixture). ``user``: keeps a user on one version of a name with a traffic split."""
        if not self.ready:
            raise NotReadyError("the server is not ready or is shutting down")
        if request_id is not None and request_id in self._requests:  # its stream and sampler state are keyed by it
            raise InvalidRequestError(f"request id {request_id!r} is already in flight; give each request its own",
                                      param="request_id")
        self._validate(prompt_token_ids, params)
        if self._num_waiting() >= self.config.max_waiting:
            raise QueueFullError(f"too many waiting requests (limit {self.config.max_waiting}); retry shortly")
        if adapters is None:
            adapters = [] if adapter in (None, self.model_name) else [(adapter, 1.0)]
        uses = self._hold(self._mixture(adapters), user)
        req = Request(request_id or f"req-{uuid.uuid4().hex}", list(prompt_token_ids), params, uses)
        stream = RequestStream(req.request_id, self, uses)
        self._requests[req.request_id] = (req, stream)
        self._submit(_Admission(self.engine.scheduler.waiting, req))
        return stream

    def _num_waiting(self) -> int:
        """Requests waiting to be scheduled: the scheduler's and those still in the inbox (not its admin jobs)."""
        with self._lock:
            admitting = sum(isinstance(fn, _Admission) for fn in self._inbox)
        return len(self.engine.scheduler.waiting) + admitting

    def _mixture(self, adapters: list[tuple[str, float]]) -> list[tuple[str, float]]:
        """The (name, scale) pairs of a request, checked before anything is resolved or loaded: at most
        --max-adapters-per-request (and --max-loras) distinct names, finite scales within +-MAX_SCALE."""
        limit = min(self.config.max_adapters_per_request, self.config.max_loras)
        if len(adapters) > limit:
            raise InvalidRequestError(f"{len(adapters)} adapters in one request; at most {limit} (--max-adapters-"
                                      "per-request, and no more than --max-loras)", param="adapters")
        names = [name for name, _ in adapters]
        if len(set(names)) != len(names):
            raise InvalidRequestError("an adapter is named twice in one request; give each once, with its total "
                                      "scale", param="adapters")
        for name, scale in adapters:
            if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
                raise InvalidRequestError(f"adapter {name!r}: scale {scale} must be finite and within "
                                          f"+-{MAX_SCALE:g}", param="adapters")
        return adapters

    def _hold(self, adapters: list[tuple[str, float]], user: str | None = None) -> tuple[AdapterUse, ...]:
        """Resolve every named adapter first (404 naming the first unknown one; a kind that may not be mixed is
        400, read from its config before any load where the source is local), then hold each (in flight) and
        start its load. A refused request holds nothing, and names it registered on demand are forgotten again."""
        store = self.engine.store
        fresh = [name for name, _ in adapters if name not in store.entries]
        try:
            uses = tuple(AdapterUse(name, store.resolve(name, user), scale) for name, scale in adapters)
            error = mixture_error(uses, store.declared_kind)
            if error:
                raise AdapterError(error, param="adapters")
        except SwapserveError:
            for name in fresh:
                if name in store.entries:
                    store.unregister(name)
            raise
        for use in uses:
            store.acquire(use.entry)
            store.ensure_host(use.entry)
        return uses

    async def adapter_loaded(self, request_id: str) -> None:
        """Wait until every adapter of an added request is in host memory; when one cannot load, the load's own
        error class (400 bad adapter, 403 out of the roots, 503 no room under --max-cpu-lora-bytes), else
        AdapterError; AdapterError too when a mixture holds an adapter that may not be mixed (known once loaded).
        The routes await this before their status line, so a stream never answers 200 and then fails."""
        item = self._requests.get(request_id)
        uses = item[0].uses if item else ()
        for use in uses:
            await self._loaded(use.entry)
        error = mixture_error(uses)
        if error:
            raise AdapterError(error, param="adapters")

    @staticmethod
    async def _loaded(entry) -> None:
        fut = entry.future if entry.weights is None else None
        if fut is None:  # resident, or no load started: nothing to wait for here
            return
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            if not fut.cancelled():
                raise  # this request was cancelled (client gone)
            # the load itself was cancelled (shutdown): the request stays with the engine, which ends it
        except Exception as exc:
            error = type(exc) if isinstance(exc, SwapserveError) else AdapterError
            raise error(f"adapter {entry.name!r} failed to load: {entry.error}", param="model") from None

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.engine.runner.vocab_size
        bad = next((t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of the vocabulary [0, {vocab})", param="prompt")
        for field in ("logit_bias", "allowed_token_ids", "stop_token_ids"):
            bad = next((t for t in getattr(params, field) or () if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"{field}: token id {bad} is out of the vocabulary [0, {vocab})",
                                          param=field)
        if params.min_tokens > params.max_tokens:
            raise InvalidRequestError(f"min_tokens ({params.min_tokens}) must be less than or equal to max_tokens "
                                      f"({params.max_tokens})", param="min_tokens")
        max_len = self.engine.max_len
        if len(prompt) + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{len(prompt) + params.max_tokens} tokens ({len(prompt)} in the messages, {params.max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.", param="max_tokens")

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, adapter: str | None = None,
                       request_id: str | None = None,
                       adapters: list[tuple[str, float]] | None = None) -> AsyncIterator[RequestOutput]:
        stream = self.add_request(prompt_token_ids, params, adapter, request_id, adapters)
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        item = self._requests.get(request_id)
        if item is not None:
            item[0].aborted = True
            self._wake.set()

    # ---- adapters (admin) -------------------------------------------------------------------------------
    async def load_adapter(self, name: str, source: str, pinned: bool = False, replace: bool = False,
                           trusted: bool = False) -> dict:
        """``trusted``: a directory the server wrote itself (a merge), read as is, not held to the adapter roots."""
        store = self.engine.store
        checked = source if trusted else store.check_source(source)
        old = store.entries.get(name)
        entry = store.register(name, checked, pinned, replace, trusted)
        try:
            await asyncio.wrap_future(store.ensure_host(entry))
        except Exception as e:
            store.restore(entry, old)  # a failed reload leaves the name on the version it had
            error = type(e) if isinstance(e, SwapserveError) else AdapterError  # 503 no room, 403 out of the roots
            raise error(f"failed to load adapter {name!r}: {entry.error or e}", param="lora_path") from None
        if old is not None and old.key not in (None, entry.key) and not store.pinned(old.content):
            self._submit(lambda: self.engine.unpin_device(old.key))  # the older version stays, as name@version
        current = store.entries.get(name, entry)  # the entry it already had, for the same content
        if not current.pinned and current.key is not None and not store.pinned(current.content):
            self._submit(lambda: self.engine.unpin_device(current.key))  # re-registered unpinned: unpin its slot
        return self._info(current)

    async def merge_adapter(self, spec: MergeSpec, pinned: bool = False, replace: bool = False) -> dict:
        """A new adapter ``spec.name`` made by PEFT's add_weighted_adapter on the merge thread (AdapterMerger: over
        a weightless skeleton of the base), written under --adapters-cache, then loaded like any adapter (content
        hash, host budget). 404 for an unknown source, 400 with PEFT's reason when PEFT refuses the merge."""
        sources = self.merger.sources(spec)
        path = await asyncio.wrap_future(self.merger.submit(spec, sources))
        try:
            return await self.load_adapter(spec.name, str(path), pinned, replace, trusted=True)
        finally:
            self.merger.prune(spec.name, self.engine.store.sources_of(spec.name))

    async def unload_adapter(self, name: str, version: str | None = None) -> None:
        """Forget ``name`` (or only its ``version``); the slots of versions nothing holds any more are freed (those
        still read by requests in flight, once the last finishes)."""
        store = self.engine.store
        held = store.keys_of(name)
        store.unregister(name, version)
        self.merger.prune(name, store.sources_of(name))  # the files of a merged version no name holds any more
        for key in held:
            if not store.known(key):
                self._submit(lambda key=key: self.engine.drop_device(key))

    def rollback_adapter(self, name: str, version: str) -> dict:
        """Point ``name`` back at one of its loaded versions (UnknownAdapterError, 404, for an unknown one)."""
        store = self.engine.store
        old = store.entries.get(name)
        entry = store.rollback(name, version)
        if old is not None and old.key not in (None, entry.key) and not store.pinned(old.content):
            self._submit(lambda: self.engine.unpin_device(old.key))
        return self._info(entry)

    def set_traffic(self, name: str, split: dict | None) -> dict | None:
        """Route requests for ``name`` to its versions by ``split`` ({version: weight}, summing to 100: else
        InvalidRequestError, 400); None removes the split. Returns the split now in force (None: none)."""
        self.engine.store.set_split(name, split)
        return self.engine.store.splits.get(name)

    def adapter_versions(self, name: str) -> list[dict]:
        """The loaded versions of ``name``, oldest first: version, current, tier, size_bytes, in_flight, source,
        weight (its share of the traffic split, None without one)."""
        store = self.engine.store
        with store.lock:
            current = store.entries.get(name)
            if current is None:
                raise UnknownAdapterError(f"The lora adapter '{name}' cannot be found.", param="name")
            split = store.splits.get(name)
            return [{"version": v, "current": e is current, "tier": self._tier(e), "source": e.source,
                     "size_bytes": e.info.get("size_bytes"), "in_flight": e.content.in_flight,
                     "loaded_at": e.created, "weight": None if split is None else split.get(v, 0.0)}
                    for v, e in store.history.get(name, {}).items()]

    def residency(self) -> list[dict]:
        """Where every loaded version is: {adapter (the name; name@version for one that is not current), version,
        tier, pinned}, for the residency gauges."""
        store = self.engine.store
        with store.lock:
            return [{"adapter": name if store.entries.get(name) is e else f"{name}@{v}", "version": v,
                     "tier": self._tier(e), "pinned": e.pinned and store.entries.get(name) is e}
                    for name, versions in store.history.items() for v, e in versions.items()]

    def list_adapters(self) -> list[dict]:
        store = self.engine.store
        with store.lock:
            return [self._info(e) for e in store.entries.values()]

    def adapter_info(self, name: str) -> dict:
        """list_adapters' entry for ``name``; UnknownAdapterError (404) otherwise, saying why when its on-demand
        load failed recently (AdapterStore.failure)."""
        store = self.engine.store
        with store.lock:
            entry = store.entries.get(name)
            if entry is not None:
                return self._info(entry)
        failed = store.failure(name)
        why = f"is not loaded: {failed.describe()}" if failed else "cannot be found."
        raise UnknownAdapterError(f"The lora adapter '{name}' {why}", param="name")

    def adapter_catalog(self) -> list[dict]:
        """Every adapter the server knows: list_adapters()' entries (``registered``: true), then the directories
        under the adapter roots not registered (tier "disk", server.adapters.disk_listing), then recent on-demand
        load failures (tier null, ``error`` saying why). A failed name still on disk is listed once, with both."""
        store = self.engine.store
        registered = [{**a, "registered": True} for a in self.list_adapters()]
        for adapter in registered:
            if adapter.get("type") is None:  # not loaded yet: what its config says
                adapter.update(self._described(adapter["name"]))
        names = {a["name"] for a in registered}
        disk = disk_adapters(store.roots, names)
        by_name = {a["name"]: a for a in disk}
        failed = []
        for f in store.recent_failures():
            if f.name in names:
                continue
            if f.name in by_name:
                by_name[f.name]["error"] = f.describe()
            else:
                failed.append({"name": f.name, "tier": None, "registered": False, "error": f.describe()})
        return registered + disk + failed

    def _described(self, name: str) -> dict:
        """type, rank, target_modules, size_bytes of a registered adapter never loaded, from its directory's
        config (server.adapters.disk_listing.describe_dir, read within the roots its loads are held to); {} for a Hub
        adapter not downloaded yet, or one unregistered meanwhile."""
        store = self.engine.store
        with store.lock:
            entry = store.entries.get(name)
        if entry is None or entry.source.startswith("hub:"):
            return {}
        described = describe_dir(Path(entry.source), store.sources.roots_for(entry.source, entry.trusted))
        return {k: v for k, v in described.items() if v is not None}

    def _tier(self, e) -> str:
        return ("device" if e.key is not None and self.engine.runner.manager.resident(e.key) else
                "host" if e.weights is not None else "disk")

    def _info(self, e) -> dict:
        """An adapter as GET /v1/adapters shows it: ``version`` is its current one (None before its first load),
        ``versions`` every loaded one, ``traffic`` its canary split (None without one); in_flight counts the
        requests on its current version."""
        store = self.engine.store
        return {"name": e.name, **({"type": None, "rank": None, "size_bytes": None} | e.info),
                "tier": self._tier(e), "pinned": e.pinned, "in_flight": e.in_flight, "hits": e.hits,
                "last_used": e.last_used, "source": e.source, "version": e.version,
                "versions": store.version_list(e.name), "traffic": store.splits.get(e.name)}

    def describe(self) -> dict:
        """What was loaded, where, and what it takes (the start-up log reads it)."""
        from server.engine.loader import parameter_bytes

        runner, blocks = self.engine.runner, self.engine.blocks
        return {"model": self.config.model, "device": str(runner.device),
                "dtype": str(runner.dtype).removeprefix("torch."), "quantization": self.config.quantization,
                "max_model_len": self.engine.max_len, "parameter_bytes": parameter_bytes(runner.model),
                "kv_cache_bytes": runner.kv.nbytes, "slot_bytes": runner.slot_bytes,
                "kv_cache": f"{blocks.pool.num_blocks - 1} blocks of {blocks.block_size} tokens = "
                            f"{blocks.capacity_tokens} tokens, prefix caching "
                            f"{'on' if self.config.enable_prefix_caching else 'off'}"}

    def stats(self) -> dict:
        sched = self.engine.scheduler
        running = list(sched.running)
        waiting = list(sched.waiting)
        return {**self.engine.stats(), "num_waiting": self._num_waiting(),
                "running_adapters": sorted({u.name for r in running for u in r.uses}),
                "waiting_adapters": sorted({u.name for r in waiting for u in r.uses}),
                "max_loras": self.config.max_loras}


class _Admission:
    """An inbox job that admits one request (told apart from admin jobs when counting waiting requests)."""

    __slots__ = ("waiting", "req")

    def __init__(self, waiting, req: Request):
        self.waiting, self.req = waiting, req

    def __call__(self) -> None:
        self.waiting.append(self.req)
