"""`python -m server`: flags and environment -> configs, and the SIGTERM drain of a real server process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from server.__main__ import build_configs, build_parser, main

from .conftest import free_port
from .helpers import wait_for

REPO = Path(__file__).resolve().parents[2]


def configs(argv: list[str], env: dict | None = None):
    return build_configs(build_parser().parse_args(["serve", *argv]), env or {})


def test_flags_environment_and_precedence(tmp_path):
    env = {"SWAPSERVE_MAX_LORAS": "3", "SWAPSERVE_MAX_CPU_LORAS": "6", "SWAPSERVE_ADAPTER_ROOT": "/a,/b",
           "SWAPSERVE_ALLOW_HUB_ADAPTERS": "yes", "SWAPSERVE_API_KEY": "from-env", "SWAPSERVE_PORT": "9000"}
    engine, server = configs(["--model", str(tmp_path), "--max-loras", "2", "--lora-modules", "a=/x", "b=/y",
                              "--lora-modules", "c=/z", "--hub-adapter-org", "org1", "--hub-adapter-org", "org2"],
                             env)
    assert engine.max_loras == 2 and engine.max_cpu_loras == 6  # flag beats env; env beats default
    assert engine.lora_modules == {"a": "/x", "b": "/y", "c": "/z"}
    assert engine.adapter_roots == ["/a", "/b"] and engine.hub_adapter_orgs == ["org1", "org2"]
    assert engine.allow_hub_adapters is True
    assert (server.api_key, server.port, server.host, server.admin_key) == ("from-env", 9000, "127.0.0.1", None)


def test_invalid_values_exit_with_usage_error(capsys):
    for argv in (["serve", "--max-loras", "0"], ["serve", "--lora-modules", "no-equals-sign"],
                 ["serve", "--dtype", "float8"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert main(["train"]) == 2 and "not yet implemented" in capsys.readouterr().err


def test_every_flag_has_help_and_an_environment_variable():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 25
    for action in flags:
        assert action.help and f"SWAPSERVE_{action.dest.upper()}" in action.help, action.dest


def _stream(url: str, out: dict) -> None:
    body = {"prompt": "hello world", "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.setdefault("events", []).append(line[5:].strip())
                out["started"] = True


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_model_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--model", str(tiny_model_dir), "--device", "cpu",
         "--dtype", "float32", "--served-model-name", "tiny", "--port", str(port), "--shutdown-timeout", "30"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        assert wait_for(lambda: _status(f"{url}/ready") == 200, timeout=120), "server did not become ready"
        out: dict = {}
        streamer = threading.Thread(target=_stream, args=(url, out))
        streamer.start()
        assert wait_for(lambda: out.get("started"), timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: _status(f"{url}/v1/completions", {"prompt": "x", "max_tokens": 1}) == 503, 5)
        assert _status(f"{url}/ready") in (503, None)
        streamer.join(60)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = proc.stdout.read()
    assert "admin routes: loopback clients only" in logs and "draining" in logs
    assert out["events"][-1] == "[DONE]"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in out["events"][:-1]]
    assert finals[-1] == "length"  # the in-flight request ran to its end


def _status(url: str, body: dict | None = None) -> int | None:
    try:
        r = httpx.post(url, json=body, timeout=5) if body else httpx.get(url, timeout=5)
        return r.status_code
    except httpx.HTTPError:
        return None
