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


def test_threads_and_cache_dir_from_flags_or_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    engine, _ = configs(["--model", str(tmp_path)])
    assert engine.threads == 0 and engine.cache_dir == str(tmp_path / "xdg" / "swapserve")
    engine, _ = configs(["--model", str(tmp_path)], {"SWAPSERVE_THREADS": "2", "SWAPSERVE_CACHE_DIR": "/c/env"})
    assert (engine.threads, engine.cache_dir) == (2, "/c/env")
    engine, _ = configs(["--model", str(tmp_path), "--threads", "1", "--cache-dir", "/c/flag"],
                        {"SWAPSERVE_THREADS": "2", "SWAPSERVE_CACHE_DIR": "/c/env"})
    assert (engine.threads, engine.cache_dir) == (1, "/c/flag")
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    threads_help = next(a.help for a in serve._actions if a.dest == "threads")
    assert "shared CPU" in threads_help


@pytest.mark.parametrize("flag,env,values", [("lora-kernel", "SWAPSERVE_LORA_KERNEL", ("reference", "numba")),
                                              ("cpu-gemm", "SWAPSERVE_CPU_GEMM", ("torch", "onednn"))])
def test_kernel_choices_from_flag_or_environment(tmp_path, flag, env, values):
    field = flag.replace("-", "_")
    assert getattr(configs(["--model", str(tmp_path)])[0], field) == "auto"
    assert getattr(configs(["--model", str(tmp_path)], {env: values[0]})[0], field) == values[0]
    assert getattr(configs(["--model", str(tmp_path), f"--{flag}", values[1]], {env: values[0]})[0], field) == values[1]


def test_host_budget_and_hub_cache_flags_from_flag_or_environment(tmp_path):
    engine, _ = configs(["--model", str(tmp_path)])
    assert (engine.cpu_lora_wait, engine.adapters_cache_bytes) == (10.0, 10 << 30)
    env = {"SWAPSERVE_CPU_LORA_WAIT": "2.5", "SWAPSERVE_ADAPTERS_CACHE_BYTES": "1000"}
    engine, _ = configs(["--model", str(tmp_path)], env)
    assert (engine.cpu_lora_wait, engine.adapters_cache_bytes) == (2.5, 1000)
    engine, _ = configs(["--model", str(tmp_path), "--cpu-lora-wait", "0", "--adapters-cache-bytes", "7"], env)
    assert (engine.cpu_lora_wait, engine.adapters_cache_bytes) == (0.0, 7)


def test_invalid_values_exit_with_usage_error(capsys):
    for argv in (["serve", "--max-loras", "0"], ["serve", "--lora-modules", "no-equals-sign"],
                 ["serve", "--dtype", "float8"], ["serve", "--threads", "-1"], ["serve", "--lora-kernel", "cuda"],
                 ["serve", "--cpu-gemm", "mkl"], ["serve", "--cpu-lora-wait", "-1"],
                 ["serve", "--adapters-cache-bytes", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:  # train without --data/--output: argparse usage error
        main(["train"])
    assert exc.value.code == 2


def test_every_flag_has_help_and_an_environment_variable():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    vllm = next(g for g in serve._action_groups if g.title == "vLLM spellings")._group_actions
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help" and a not in vllm]
    assert len(flags) >= 25
    for action in flags:
        assert action.help and f"SWAPSERVE_{action.dest.upper()}" in action.help, action.dest
    assert all(a.help for a in vllm)


def test_vllm_spellings_mean_the_same_or_are_refused_naming_ours(tmp_path, capsys):
    """A `vllm serve` command line: MODEL positional, --enable-lora, --disable-log-requests and
    --uvicorn-log-level work as there; --gpu-memory-utilization is refused naming --kv-cache-memory."""
    engine, server = configs([str(tmp_path), "--enable-lora", "--disable-log-requests", "--uvicorn-log-level",
                              "WARNING", "--max-loras", "100"])
    assert engine.model == str(tmp_path) and server.log_level == "warning" and not server.enable_log_requests
    assert engine.max_cpu_loras == 100  # unset, it follows --max-loras up (vLLM's default)
    assert configs(["--model", str(tmp_path), "--log-level", "DEBUG"])[1].log_level == "debug"
    for argv, words in ((["--gpu-memory-utilization", "0.9"], "--kv-cache-memory"),
                        (["a", "--model", "b"], "given twice"),
                        (["--served-model-name", "foo", "--lora-modules", "foo=/x"], "--served-model-name"),
                        (["--disable-log-requests", "--enable-log-requests"], "contradict")):
        with pytest.raises(SystemExit) as exc:
            main(["serve", *argv])
        assert exc.value.code == 2 and words in capsys.readouterr().err, argv


def test_a_shutdown_timeout_without_a_deadline_is_refused(tmp_path):
    for value in ("inf", "nan", "-1"):
        with pytest.raises(ValueError, match="--shutdown-timeout must be seconds"):
            configs(["--model", str(tmp_path), "--shutdown-timeout", value])


@pytest.mark.parametrize("env, words", [({"SWAPSERVE_ENABLE_PREFIX_CACHING": "flase"}, "give one of"),
                                        ({"SWAPSERVE_PORT": "abc"}, "SWAPSERVE_PORT='abc'")])
def test_environment_values_that_mean_nothing_are_refused_naming_the_variable(tmp_path, env, words):
    with pytest.raises(ValueError, match=words):
        configs(["--model", str(tmp_path)], env)
    assert configs(["--model", str(tmp_path)], {"SWAPSERVE_ENABLE_PREFIX_CACHING": "OFF"})[0].enable_prefix_caching is False


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
         "--dtype", "float32", "--served-model-name", "tiny", "--port", str(port), "--shutdown-timeout", "30",
         "--threads", "1"],
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
    for line in ("loading model", "in the background", "threads=1", "KV cache", "adapter slots", "parameters",
                 "max_lora_rank=16", "ready: /ready answers 200"):
        assert line in logs, line
    assert out["events"][-1] == "[DONE]"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in out["events"][:-1]]
    assert finals[-1] == "length"  # the in-flight request ran to its end


def _status(url: str, body: dict | None = None) -> int | None:
    try:
        r = httpx.post(url, json=body, timeout=5) if body else httpx.get(url, timeout=5)
        return r.status_code
    except httpx.HTTPError:
        return None


def test_a_model_path_that_does_not_exist_is_one_line_not_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--model", str(tmp_path / "nope"), "--port",
                          str(free_port())], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 1
    assert "start-up failed: --model" in out.stderr and "no such directory" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
