"""API fixtures: real uvicorn servers (in a thread, on a free loopback port) over real AsyncEngines.

`server` is shared by most tests (open inference, loopback-only admin, an adapter root with two LoRAs, one
adapter preloaded with --lora-modules); `auth_server` has both keys set; `tight_server` has a 1-row batch and a
1-entry waiting queue so overload is reachable.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.api.app import create_app
from server.api.settings import ServerConfig
from server.config import EngineConfig

API_KEY = "sk-test-inference"
ADMIN_KEY = "sk-test-admin"
MAX_MODEL_LEN = 512  # the tiny Llama's max_position_embeddings


@dataclass
class LiveServer:
    url: str
    app: object
    engine: object

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def openai(self, api_key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(engine_config: EngineConfig, server_config: ServerConfig | None = None):
    """Build the engine, serve create_app() with uvicorn on a thread, yield a LiveServer, stop it."""
    from server.engine.async_engine import AsyncEngine

    port = free_port()
    server_config = server_config or ServerConfig()
    server_config.port = port
    engine = AsyncEngine(engine_config)
    app = create_app(engine, server_config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield LiveServer(f"http://127.0.0.1:{port}", app, engine)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def adapter_root(adapters, tmp_path_factory) -> Path:
    """An --adapter-root holding LoRAs 'alpha', 'gamma' (same weights), 'beta', and 'broken' (unloadable)."""
    root = tmp_path_factory.mktemp("adapter-root")
    shutil.copytree(adapters["lora"], root / "alpha")
    shutil.copytree(adapters["lora"], root / "gamma")
    shutil.copytree(adapters["lora2"], root / "beta")
    (root / "broken").mkdir()  # found by name, fails to load
    (root / "broken" / "adapter_config.json").write_text("{not json")
    return root


def engine_config(model_dir: Path, adapter_root: Path | None = None, **overrides) -> EngineConfig:
    values = dict(model=str(model_dir), served_model_name="tiny-llama", device="cpu", dtype="float32",
                  max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_loras=2, max_cpu_loras=4,
                  adapter_roots=[str(adapter_root)] if adapter_root else [],
                  adapters_cache=os.path.join(tempfile.gettempdir(), "swapserve-api-tests"))  # Hub off: unused
    values.update(overrides)
    return EngineConfig(**values)


@pytest.fixture(scope="session")
def server(tiny_model_dir, adapter_root):
    config = engine_config(tiny_model_dir, adapter_root, lora_modules={"preloaded": str(adapter_root / "alpha")})
    with live_server(config, ServerConfig(max_body_bytes=64 * 1024, shutdown_timeout=2)) as live:
        yield live


@pytest.fixture(scope="module")
def auth_server(tiny_model_dir, adapter_root):
    config = engine_config(tiny_model_dir, adapter_root)
    with live_server(config, ServerConfig(api_key=API_KEY, admin_key=ADMIN_KEY, shutdown_timeout=2)) as live:
        yield live


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir):
    config = engine_config(tiny_model_dir, max_num_seqs=1, max_waiting=1)
    with live_server(config, ServerConfig(shutdown_timeout=2)) as live:
        yield live
