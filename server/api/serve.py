"""serve(): open the port, build the engine in the background, log what was loaded, run uvicorn until SIGTERM
has drained.

Start-up: the port opens at once with a PendingEngine behind the app (/health 200, /ready 503, inference and
admin routes 503 "model is loading"); a background thread builds the AsyncEngine (load, quantize, warm up), the
event loop starts its step loop, and /ready turns 200. A model that fails to load stops the server (status 1).

First SIGTERM/SIGINT: the engine stops admitting (new requests get 503 while the socket stays open, /ready
turns 503 so balancers move away), in-flight requests get up to --shutdown-timeout, then uvicorn closes the
socket and connections and the process exits 0. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Callable

import uvicorn

from server.api.app import Lifecycle, create_app
from server.api.auth import is_loopback
from server.api.settings import ServerConfig
from server.errors import NotReadyError, SwapserveError

log = logging.getLogger("swapserve")


class ModelLoadingError(NotReadyError, AttributeError):
    """What the PendingEngine raises for the engine's attributes before the engine exists (503; and an
    AttributeError, so getattr(engine, name, default) still returns the default)."""


class PendingEngine:
    """Stands in for the AsyncEngine while a background thread builds it; afterwards forwards everything to it.

    loading: True until the engine is built and its step loop runs (or the build failed, or shutdown came
    first); the app answers API routes 503 "model is loading" meanwhile. ready: the built engine's. Observers
    added before the engine exists are handed to it when it does.
    """

    def __init__(self, config, build: Callable | None = None,
                 on_loaded: Callable | None = None, on_failed: Callable[[BaseException], None] | None = None):
        self.config = config
        self.model_name = config.served_model_name
        self.inner = None  # the AsyncEngine once built and started
        self.error: BaseException | None = None
        self._build = build or _build_engine
        self._on_loaded, self._on_failed = on_loaded, on_failed
        self._observers: list = []
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def loading(self) -> bool:
        return self.inner is None and self.error is None and not self._stopped

    @property
    def ready(self) -> bool:
        return self.inner is not None and self.inner.ready

    @property
    def draining(self) -> bool:
        return self.inner.draining if self.inner is not None else self._stopped

    def add_observer(self, obs) -> None:
        self._observers.append(obs)
        if self.inner is not None:
            self.inner.add_observer(obs)

    def list_adapters(self) -> list[dict]:
        return self.inner.list_adapters() if self.inner is not None else []

    def stats(self) -> dict:
        if self.inner is not None:
            return self.inner.stats()
        return {"num_running": 0, "num_waiting": 0, "running_adapters": [], "waiting_adapters": [],
                "max_loras": self.config.max_loras}

    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise ModelLoadingError(f"the model is loading ({name!r} is not available yet)")
        return getattr(inner, name)

    async def start(self) -> None:
        """Build the engine on a thread; the event loop starts it when built. Returns at once."""
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._load, args=(loop,), name="engine-load", daemon=True)
        self._thread.start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            engine = self._build(self.config)
        except BaseException as exc:  # reported; the server stops
            if isinstance(exc, (ValueError, OSError, MemoryError, SwapserveError)):  # a setting or a path at fault
                log.error("start-up failed: %s", exc)  # what to change; the traceback only for --log-level debug
                log.debug("start-up failed while loading model %s", self.config.model, exc_info=exc)
            else:
                log.exception("loading model %s failed", self.config.model)
            self._call_soon(loop, self._failed, exc)
            return
        self._call_soon(loop, lambda: asyncio.ensure_future(self._started(engine)))

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the server already exited (shut down while loading)
            pass

    def _failed(self, exc: BaseException) -> None:
        self.error = exc
        if self._on_failed is not None:
            self._on_failed(exc)

    async def _started(self, engine) -> None:
        if self._stopped:  # shut down while loading
            await engine.shutdown(0)
            return
        try:
            for obs in self._observers:
                engine.add_observer(obs)
            await engine.start()
        except Exception as exc:
            log.exception("starting the engine failed")
            self._failed(exc)
            return
        self.inner = engine
        if self._on_loaded is not None:
            self._on_loaded(engine)

    async def shutdown(self, timeout: float) -> None:
        self._stopped = True
        if self.inner is not None:
            await self.inner.shutdown(timeout)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the engine before uvicorn's own shutdown.

    Unlike uvicorn.Server it does not re-raise the caught signal after shutdown, so a drained exit is status 0.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.draining or self._loop is None or not self.started:
            self.force_exit = self.draining
            self.should_exit = True
            return
        self.draining = True
        log.info("signal %d: draining in-flight requests (up to %.1fs), refusing new ones with 503",
                 sig, self.lifecycle.shutdown_timeout)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.lifecycle.stop()
        finally:
            self.should_exit = True


def _build_engine(config):
    from server.engine.async_engine import AsyncEngine

    return AsyncEngine(config)


def serve(engine_config, server_config: ServerConfig) -> int:
    """Open the port, load the model in the background, serve until drained. Returns the exit status."""
    failed: list[BaseException] = []
    started = time.monotonic()

    def on_loaded(engine) -> None:
        log_startup(engine, server_config, time.monotonic() - started)

    def on_failed(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    engine = PendingEngine(engine_config, on_loaded=on_loaded, on_failed=on_failed)
    app = create_app(engine, server_config)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, lifespan="on",
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout) + 5)
    server = DrainingServer(config, app.state.lifecycle)
    log.info("loading model %s in the background (device=%s, dtype=%s, quantization=%s, threads=%s); "
             "/health answers now, /ready turns 200 once the model is loaded and warmed up",
             engine_config.model, engine_config.device, engine_config.dtype, engine_config.quantization,
             engine_config.threads or "default")
    server.run()
    return 1 if failed else 0


def log_startup(engine, server_config: ServerConfig, seconds: float | None = None) -> None:
    """What was loaded, where, with what memory; adapter limits; access control. One line per topic."""
    info = describe(engine)
    cfg = engine.config
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    log.info("model %s loaded%s, served as %r", info["model"], took, engine.model_name)
    log.info("device=%s dtype=%s quantization=%s threads=%s max_model_len=%d max_num_seqs=%d", info["device"],
             info["dtype"], info["quantization"], info["threads"], info["max_model_len"], cfg.max_num_seqs)
    log.info("memory: parameters %s, KV cache %s (%s), adapter slots %s; %s", _mib(info["parameter_bytes"]),
             _mib(info["kv_cache_bytes"]), info.get("kv_cache", "layout unknown"), _mib(info["slot_bytes"]),
             info["memory"])
    names = [a.get("name") for a in engine.list_adapters()]
    log.info("adapters: %d loaded %s; max_loras=%d max_lora_rank=%d max_cpu_loras=%d roots=%s", len(names),
             names, cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras, cfg.adapter_roots or "none")
    keys = (["--api-key (unrestricted)"] if server_config.api_key else []) + \
        ([f"tenant keys from {server_config.api_keys_file}"] if server_config.api_keys_file else [])
    log.info("inference routes: %s", f"key required: {' and '.join(keys)}" if keys else
             "open (no --api-key, no --api-keys-file)")
    if server_config.admin_loopback_only:
        log.warning("admin routes: loopback clients only (no --admin-key), and requests through a proxy (with "
                    "Forwarded/X-Forwarded-*/X-Real-IP headers) are refused; set --admin-key or "
                    "SWAPSERVE_ADMIN_KEY to use them through a proxy or from another host")
    else:
        log.info("admin routes: admin key required")
    if not (is_loopback(server_config.host) or server_config.host == "localhost") and not keys:
        log.warning("listening on %s without --api-key: anyone who can reach it can generate",
                    server_config.host)
    log.info("ready: /ready answers 200")


def _mib(nbytes: int | None) -> str:
    return "unknown" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def describe(engine) -> dict:
    """What the engine reports about itself (engine.describe(): a test double may have none), completed from
    the config."""
    import torch

    cfg = engine.config
    info = dict(engine.describe()) if callable(getattr(engine, "describe", None)) else {}
    info.setdefault("model", cfg.model)
    info.setdefault("device", cfg.device)
    info.setdefault("dtype", cfg.dtype)
    info.setdefault("quantization", cfg.quantization)
    info.setdefault("threads", torch.get_num_threads())
    info.setdefault("max_model_len", cfg.max_model_len)
    for key in ("parameter_bytes", "kv_cache_bytes", "slot_bytes"):
        info.setdefault(key, None)
    info.setdefault("memory", memory_summary(info["device"]))
    return info


def memory_summary(device: str) -> str:
    parts = [f"process RSS {_rss_bytes() / 2**20:.0f} MiB"]
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            parts.append(f"GPU allocated {torch.cuda.memory_allocated() / 2**20:.0f} MiB, "
                         f"free {free / 2**30:.1f} of {total / 2**30:.1f} GiB")
    return "; ".join(parts)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
