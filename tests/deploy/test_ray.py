"""deploy/ray: `serve run` on the shipped serve_config.yaml (with CPU overrides) starts two engine replicas behind
the ingress; requests for one adapter keep landing on the replica that served it, and both replicas serve; admin
loads and unloads apply to every replica; tenant keys are enforced at the ingress.

Skipped when ray[serve] is not installed (the `ray` extra). Runs a private local Ray cluster in a subprocess
(`serve run --address local`), so it never touches a cluster someone else started; bounded by START_TIMEOUT.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "ray" / "serve_config.yaml"
START_TIMEOUT = 300  # seconds for Ray, the ingress and both replicas to come up on a busy 2-core machine
SETTLE = 3.0  # seconds for a replica's adapter record to reach Ray's router (pushed every 0.1 s)
REPLICA = "x-swapserve-replica"
API_KEY, ADMIN_KEY = "sk-ray-all-0000", "sk-ray-admin-0000"
TENANTS = [{"key": "sk-ray-tenant-0001", "name": "tenant", "adapters": ["alpha"]},
           {"key": "sk-ray-rpm-0002", "name": "rpm", "base_model": True, "rpm": 2}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_config(out: Path, model_dir: Path, adapter_root: Path, port: int, keys: Path) -> Path:
    """The shipped config with the tiny model, loopback HTTP, two CPU engine replicas and small CPU shares, the
    api, admin and tenant keys."""
    config = yaml.safe_load(CONFIG.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"].update({"model": str(model_dir), "served-model-name": "tiny", "device": "cpu", "dtype": "float32",
                        "max-model-len": 512, "adapter-root": [str(adapter_root)], "max-loras": 2,
                        "max-cpu-loras": 4, "shutdown-timeout": 2, "api-key": API_KEY, "admin-key": ADMIN_KEY,
                        "api-keys-file": str(keys)})
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": 0}
        if deployment["name"] == "EngineReplica":
            deployment["num_replicas"] = 2
    path = out / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _serve_command() -> list[str]:
    script = Path(sys.executable).with_name("serve")
    return [str(script) if script.exists() else shutil.which("serve") or "serve", "run", "--address", "local"]


@pytest.fixture(scope="module")
def ray_app(tiny_model_dir, adapters, tmp_path_factory):
    """Base URL of a running `serve run` of the CPU config; stopped (SIGINT, then SIGKILL) afterwards."""
    work = tmp_path_factory.mktemp("ray")
    root = work / "adapters"
    shutil.copytree(adapters["lora"], root / "alpha")
    shutil.copytree(adapters["lora2"], root / "beta")
    shutil.copytree(adapters["lora2"], root / "delta")  # only ever asked for by a tenant that may not use it
    keys = work / "keys.json"
    keys.write_text(json.dumps(TENANTS))
    port = _free_port()
    config = cpu_config(work, tiny_model_dir, root, port, keys)
    log = (work / "serve.log").open("w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([*_serve_command(), str(config)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_both_replicas_serve(url, proc, work / "serve.log")
        yield url
    finally:
        _stop(proc)
        log.close()


def _wait_until_both_replicas_serve(url: str, proc: subprocess.Popen, log: Path) -> None:
    """Ready once base-model requests (Ray's power-of-two choices) have been answered by two replicas."""
    deadline = time.monotonic() + START_TIMEOUT
    seen: set[str] = set()
    while len(seen) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"serve run did not bring up 2 replicas (exit {proc.poll()}, replicas seen {seen}); "
                        f"log tail:\n{log.read_text()[-4000:]}")
        try:
            response = httpx.post(f"{url}/v1/completions", json=_completion("tiny"), headers=_bearer(API_KEY),
                                  timeout=30)
            if response.status_code == 200:
                seen.add(response.headers[REPLICA])
                continue
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # serve run: serve.shutdown(), then the local cluster stops
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this cluster still in our process group
    except ProcessLookupError:
        pass
    proc.wait(10)


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _completion(model: str) -> dict:
    return {"model": model, "prompt": "hello world", "max_tokens": 2, "temperature": 0}


def _replica_for(url: str, model: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json=_completion(model), headers=_bearer(API_KEY), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return response.headers[REPLICA]


def test_requests_for_an_adapter_stay_on_its_replica_and_both_replicas_serve(ray_app):
    alpha = _replica_for(ray_app, "alpha")  # nobody holds alpha: any replica
    time.sleep(SETTLE)
    assert {_replica_for(ray_app, "alpha") for _ in range(6)} == {alpha}

    beta = _replica_for(ray_app, "beta")  # nobody holds beta: the replica holding fewer adapters, i.e. the other
    assert beta != alpha
    time.sleep(SETTLE)
    assert {_replica_for(ray_app, "beta") for _ in range(6)} == {beta}
    assert {_replica_for(ray_app, "alpha") for _ in range(3)} == {alpha}


def test_the_ingress_relays_swapserve_responses(ray_app):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{ray_app}/v1/chat/completions", json=body, headers=_bearer(API_KEY),
                      timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]" and len(events) >= 3

    missing = httpx.post(f"{ray_app}/v1/completions", json=_completion("no-such-adapter"), headers=_bearer(API_KEY),
                         timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"  # the engine's own error
    tgi = httpx.post(f"{ray_app}/generate", json={"inputs": "hello", "parameters": {"adapter_id": "beta",
                                                                                     "max_new_tokens": 2}},
                     headers=_bearer(API_KEY), timeout=60)
    assert tgi.status_code == 200 and "generated_text" in tgi.json()
    assert httpx.get(f"{ray_app}/ready", timeout=30).status_code == 200
    assert httpx.get(f"{ray_app}/health", timeout=30).status_code == 200
    assert httpx.get(f"{ray_app}/no/such/route", timeout=30).status_code == 404


def _adapters(url: str) -> dict[str, dict]:
    response = httpx.get(f"{url}/v1/adapters", headers=_bearer(ADMIN_KEY), timeout=60)
    assert response.status_code == 200, response.text
    return {a["name"]: a for a in response.json()["data"]}


def test_admin_load_and_unload_apply_to_every_replica(ray_app, tiny_model_dir, tmp_path):
    assert httpx.get(f"{ray_app}/v1/adapters", headers=_bearer(API_KEY), timeout=30).status_code == 401
    root = Path(tiny_model_dir).parent  # any path outside the roots: refused by every replica alike
    refused = httpx.post(f"{ray_app}/v1/load_lora_adapter", headers=_bearer(ADMIN_KEY), timeout=120,
                         json={"lora_name": "outside", "lora_path": str(root)})
    assert refused.status_code == 403 and len(refused.headers["x-swapserve-replicas"].split(",")) == 2

    source = _adapters(ray_app)["alpha"]["source"]  # alpha was loaded on demand by an earlier test
    loaded = httpx.post(f"{ray_app}/v1/load_lora_adapter", headers=_bearer(ADMIN_KEY), timeout=120,
                        json={"lora_name": "everywhere", "lora_path": source})
    assert loaded.status_code == 200 and loaded.text.startswith("Success"), loaded.text
    replicas = set(loaded.headers["x-swapserve-replicas"].split(","))
    assert len(replicas) == 2
    entry = _adapters(ray_app)["everywhere"]
    assert {r["replica"] for r in entry["replicas"]} == replicas
    assert all(r["tier"] in ("host", "device") for r in entry["replicas"])
    one = httpx.get(f"{ray_app}/v1/adapters/everywhere", headers=_bearer(ADMIN_KEY), timeout=60).json()
    assert {r["replica"] for r in one["replicas"]} == replicas
    assert {_replica_for(ray_app, "everywhere") for _ in range(3)} <= replicas

    unloaded = httpx.post(f"{ray_app}/v1/unload_lora_adapter", headers=_bearer(ADMIN_KEY), timeout=120,
                          json={"lora_name": "everywhere"})
    assert unloaded.status_code == 200 and set(unloaded.headers["x-swapserve-replicas"].split(",")) == replicas
    assert "everywhere" not in _adapters(ray_app)
    again = httpx.post(f"{ray_app}/v1/unload_lora_adapter", headers=_bearer(ADMIN_KEY), timeout=120,
                       json={"lora_name": "everywhere"})
    assert again.status_code == 404  # on every replica alike


def test_tenant_keys_are_enforced_at_the_ingress(ray_app):
    def post(key: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
        return httpx.post(f"{ray_app}{path}", json=body, headers=_bearer(key), timeout=60)

    tenant = "sk-ray-tenant-0001"
    allowed = post(tenant, _completion("alpha"))
    assert allowed.status_code == 200 and REPLICA in allowed.headers
    for body, path in ((_completion("delta"), "/v1/completions"), (_completion("tiny"), "/v1/completions"),
                       ({**_completion("tiny"), "adapters": [{"name": "alpha"}, {"name": "delta"}]}, "/v1/completions"),
                       ({"inputs": "hi", "parameters": {"adapter_id": "delta"}}, "/generate")):
        denied = post(tenant, body, path)
        assert denied.status_code == 403 and REPLICA not in denied.headers, denied.text  # refused at the ingress
    assert "delta" not in _adapters(ray_app)  # never loaded on any replica
    models = httpx.get(f"{ray_app}/v1/models", headers=_bearer(tenant), timeout=60).json()["data"]
    assert {m["id"] for m in models} <= {"alpha"}  # one replica's list (it may not hold alpha), never beta or tiny
    assert post("sk-wrong", _completion("tiny")).status_code == 401

    rpm = "sk-ray-rpm-0002"
    assert post(rpm, _completion("tiny")).status_code == 200 and post(rpm, _completion("tiny")).status_code == 200
    limited = post(rpm, _completion("tiny"))  # two replicas, one minute window for the deployment
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1 and REPLICA not in limited.headers
