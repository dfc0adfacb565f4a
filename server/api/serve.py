"""serve(): build the engine and app, log what was loaded, run uvicorn until SIGTERM has drained.

First SIGTERM/SIGINT: the engine stops admitting (new requests get 503 while the socket stays open, /ready
turns 503 so balancers move away), in-flight requests get up to --shutdown-timeout, then uvicorn closes the
socket and connections and the process exits 0. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import os

import uvicorn

from server.api.app import Lifecycle, create_app
from server.api.auth import is_loopback
from server.api.settings import ServerConfig

log = logging.getLogger("swapserve")


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


def serve(engine_config, server_config: ServerConfig) -> int:
    """Load the model (blocking), then serve until drained. Returns the process exit status."""
    from server.engine.engine import AsyncEngine

    log.info("loading model %s (device=%s, dtype=%s, quantization=%s)", engine_config.model,
             engine_config.device, engine_config.dtype, engine_config.quantization)
    engine = AsyncEngine(engine_config)
    app = create_app(engine, server_config)
    log_startup(engine, server_config)
    config = uvicorn.Config(app, host=server_config.host, port=server_config.port,
                            log_level=server_config.log_level, lifespan="on",
                            timeout_graceful_shutdown=int(server_config.shutdown_timeout) + 5)
    DrainingServer(config, app.state.lifecycle).run()
    return 0


def log_startup(engine, server_config: ServerConfig) -> None:
    """One line each: model, placement, memory, adapters, access control."""
    info = describe(engine)
    log.info("model %s served as %r", info["model"], engine.model_name)
    log.info("device=%s dtype=%s quantization=%s max_model_len=%d max_num_seqs=%d", info["device"],
             info["dtype"], info["quantization"], engine.config.max_model_len, engine.config.max_num_seqs)
    log.info("memory: %s", info["memory"])
    names = [a.get("name") for a in engine.list_adapters()]
    log.info("adapters: %d loaded %s; max_loras=%d max_cpu_loras=%d roots=%s", len(names), names,
             engine.config.max_loras, engine.config.max_cpu_loras, engine.config.adapter_roots or "none")
    log.info("inference routes: %s", "API key required" if server_config.api_key else "open (no --api-key)")
    if server_config.admin_loopback_only:
        log.info("admin routes: loopback clients only (no --admin-key)")
    else:
        log.info("admin routes: admin key required")
    if not is_loopback(server_config.host) and not server_config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can generate",
                    server_config.host)


def describe(engine) -> dict:
    """What the engine reports about itself (engine.describe() when it has one), with config fallbacks."""
    cfg = engine.config
    info = dict(engine.describe()) if callable(getattr(engine, "describe", None)) else {}
    runner = getattr(getattr(engine, "engine", None), "runner", None)  # until the engine has describe()
    info.setdefault("model", cfg.model)
    info.setdefault("device", str(getattr(runner, "device", cfg.device)))
    info.setdefault("dtype", str(getattr(runner, "dtype", cfg.dtype)).removeprefix("torch."))
    info.setdefault("quantization", cfg.quantization)
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
