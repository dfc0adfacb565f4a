"""deploy/k8s: the manifests parse; probes and the scrape path are routes create_app() serves; the stop sequence
fits the grace period; the pod asks for a GPU and an in-memory /dev/shm; every Secret key, claim, port and
label it refers to exists; its SWAPSERVE_* settings are real flags that the CLI accepts."""
from __future__ import annotations

import re
from collections import defaultdict

import pytest
import yaml

from .helpers import FLAG_ENV_NAMES, REPO, configs_from, served_routes

K8S = REPO / "deploy" / "k8s"


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    """Every document of deploy/k8s/*.yaml, by kind."""
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                by_kind[doc["kind"]].append(doc)
    return by_kind


def one(manifests, kind: str) -> dict:
    assert len(manifests[kind]) == 1, f"expected one {kind}"
    return manifests[kind][0]


@pytest.fixture(scope="module")
def pod(manifests) -> dict:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (container,) = pod["containers"]
    return container


@pytest.fixture(scope="module")
def configs(container):
    """The EngineConfig and ServerConfig the container's args and plain env values give."""
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return configs_from(container.get("args", []), env)


def test_every_manifest_is_listed_in_the_kustomization(manifests):
    listed = set(one(manifests, "Kustomization")["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_probes_point_at_real_routes(container):
    routes = served_routes()
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        assert "GET" in routes.get(probe["path"], set()), f"{kind} {probe['path']} is not a GET route of create_app"
        assert probe["port"] in ("http", 8000)
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    assert probes["readinessProbe"]["path"] == "/ready"


def test_the_grace_period_covers_prestop_and_the_drain(pod, container, configs):
    _, server = configs
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:  # Kubernetes' own sleep action
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        sleep = float(command[1])
    assert sleep > 0
    assert pod["terminationGracePeriodSeconds"] >= server.shutdown_timeout + sleep


def test_environment_names_real_flags_and_the_server_listens_on_its_port(container, configs):
    names = [e["name"] for e in container["env"]]
    unknown = [n for n in names if n.startswith("SWAPSERVE_") and n not in FLAG_ENV_NAMES]
    assert not unknown, f"not `swapserve serve` flags (ignored at run time): {unknown}"
    _, server = configs
    assert server.host == "0.0.0.0"
    assert container["ports"] == [{"name": "http", "containerPort": server.port}]


def test_resources_include_a_gpu(container):
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
        resources["limits"]["nvidia.com/gpu"]  # extended resources: requests == limits
    assert {"cpu", "memory"} <= resources["requests"].keys() and "memory" in resources["limits"]


def test_dev_shm_is_an_in_memory_empty_dir(pod, container):
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def test_referenced_secret_keys_exist(manifests, container):
    secrets = {s["metadata"]["name"]: {**s.get("data", {}), **s.get("stringData", {})} for s in manifests["Secret"]}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "secretKeyRef" in
            e.get("valueFrom", {})}
    assert {"SWAPSERVE_API_KEY", "SWAPSERVE_ADMIN_KEY"} <= refs.keys()
    for env, ref in refs.items():
        assert ref["name"] in secrets, f"{env}: no Secret {ref['name']}"
        assert ref["key"] in secrets[ref["name"]], f"{env}: Secret {ref['name']} has no key {ref['key']}"


def test_claims_exist_and_caches_live_on_volumes(manifests, pod, container, configs):
    claims = {c["metadata"]["name"] for c in manifests["PersistentVolumeClaim"]}
    referenced = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert referenced and referenced <= claims
    engine, _ = configs
    env = {e["name"]: e.get("value") for e in container["env"]}
    on_claims = {m["mountPath"] for m in container["volumeMounts"] if m["name"] in
                 {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}}
    for path in (env["HF_HOME"], engine.adapters_cache, *engine.adapter_roots):
        assert path in on_claims, f"{path} is not on a persistent volume"


def test_service_and_service_monitor_reach_the_pods(manifests, container):
    deployment, service = one(manifests, "Deployment"), one(manifests, "Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in [p["name"] for p in container["ports"]]
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert "GET" in served_routes()[endpoint["path"]]


def test_pod_runs_as_the_images_non_root_user(pod):
    user = re.search(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.M)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert user and pod["securityContext"]["runAsUser"] == int(user.group(1)) != 0
