"""Small helpers shared by the API tests: polling, and reading /metrics."""
from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

import support


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def samples(http, headers: dict | None = None) -> list:
    response = http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    text = response.text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def metric_value(http, name: str, headers: dict | None = None, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0.0 when there are none)."""
    return sum(s.value for s in samples(http, headers) if s.name == name and labels.items() <= s.labels.items())


def fail_next_step(server, monkeypatch) -> None:
    """The server's next engine step raises (an injected internal error); the steps after it run as usual."""
    support.fail_next_execute(server.engine.engine.runner, monkeypatch)
