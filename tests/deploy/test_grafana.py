"""deploy/grafana: the dashboard's variables are used and its panels read the datasource variable, and the compose
`monitoring` profile provisions Prometheus and Grafana with it, scraping services that exist on the port they
serve. (That every series it reads is exported: tests/api/test_dashboard_metrics.py, on a live server.)"""
from __future__ import annotations

import json

import pytest
import yaml

from .helpers import REPO

GRAFANA = REPO / "deploy" / "grafana"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA / "swapserve.json").read_text())


def test_variables_are_used_and_panels_use_the_datasource_variable(dashboard):
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "adapter"} <= variables
    text = json.dumps(dashboard["panels"])
    for name in variables - {"datasource"}:
        assert f"${name}" in text, name
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_the_monitoring_profile_provisions_prometheus_and_grafana(dashboard):
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    mounts = {v.split(":")[1]: REPO / "deploy" / v.split(":")[0] for s in monitoring for v in services[s]["volumes"]}
    prometheus = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = prometheus["scrape_configs"]
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    assert job["metrics_path"] == "/metrics" and targets
    for target in targets:
        host, port = target.split(":")
        assert host in services and port == "8000", target
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "swapserve.yml").read_text())["providers"]
    mounted = mounts[f"{provider['options']['path']}/swapserve.json"]
    assert json.loads(mounted.read_text()) == dashboard
    assert all(p.startswith("127.0.0.1:") for s in monitoring for p in services[s]["ports"])
