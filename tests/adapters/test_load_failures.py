"""server.adapters.load_failures: failures are kept for ttl_s and at most max_count names, newest kept."""
from __future__ import annotations

from server.adapters import load_failures
from server.adapters.load_failures import LoadFailure, LoadFailures


def failure(name: str) -> LoadFailure:
    return LoadFailure(name, f"/adapters/{name}", "bad", 0.0, 400)


def test_kept_for_a_while_then_forgotten(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(load_failures.time, "monotonic", lambda: clock[0])
    failures = LoadFailures(ttl_s=600, max_count=10)
    failures.record(failure("a"))
    clock[0] += 599
    assert failures.get("a") == failure("a")
    clock[0] += 2
    assert failures.get("a") is None


def test_bounded_count_drops_the_oldest_and_forget_removes():
    failures = LoadFailures(ttl_s=600, max_count=3)
    for name in "abcd":
        failures.record(failure(name))
    assert failures.get("a") is None and all(failures.get(n) for n in "bcd")
    failures.forget("c")
    assert failures.get("c") is None
    assert "/adapters/b failed at 1970-01-01T00:00:00Z (answered 400): bad" in failures.get("b").describe()
