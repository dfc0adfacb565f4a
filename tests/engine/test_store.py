"""AdapterStore: names -> sources, the host tier (LRU by count and bytes, in-flight and pinned entries kept),
single-flight loads off the caller's thread, unload that keeps in-flight weights until the last release."""
from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

import server.adapters.store as store_module
from server.adapters.store import AdapterStore
from server.config import EngineConfig
from server.errors import AdapterError, AdapterNotAllowedError, UnknownAdapterError

NAMES = ("lora", "rslora", "dora", "ia3", "lora2")


@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store-root")
    for name in NAMES:
        shutil.copytree(adapters[name], out / name)
    return out


@pytest.fixture(scope="module")
def targets(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from server.layers.inject import target_shapes, wrap_model
    from server.layers.mapping import MappingHolder

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return target_shapes(wrap_model(model, MappingHolder(), 1, 8, torch.float32, torch.device("cpu")))


class Events:
    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    def on_adapter_event(self, event, name, seconds):
        self.seen.append((event, name))

    def count(self, event, name=None):
        return sum(1 for e, n in self.seen if e == event and (name is None or n == name))


@pytest.fixture
def make_store(root, targets, tiny_model_dir):
    made = []

    def make(**overrides) -> tuple[AdapterStore, Events]:
        cfg = EngineConfig(**{"model": str(tiny_model_dir), "max_loras": 1, "max_lora_rank": 8,
                              "adapter_roots": [str(root)], **overrides})
        events = Events()
        s = AdapterStore(cfg, targets, cfg.model, [events])
        made.append(s)
        return s, events

    yield make
    for s in made:
        s.close()


@pytest.fixture
def gate(monkeypatch):
    """Holds every adapter load until ``gate.open()``; counts the loads that reached the disk."""

    class Gate:
        def __init__(self):
            self.release = threading.Event()
            self.calls: list[str] = []
            self.lock = threading.Lock()

        def open(self):
            self.release.set()

    g = Gate()
    original = store_module.AdapterStore._read

    def held(self, directory, name):
        with g.lock:
            g.calls.append(name)
        assert g.release.wait(20), "test gate never opened"
        return original(self, directory, name)

    monkeypatch.setattr(store_module.AdapterStore, "_read", held)
    yield g
    g.open()


def load(s: AdapterStore, name: str, hold: bool = False):
    e = s.resolve(name)
    if hold:
        s.acquire(e)
    s.ensure_host(e).result(timeout=20)
    return e


def host_names(s: AdapterStore) -> list[str]:
    return [k[0] for k in s.host]


# ---- names -----------------------------------------------------------------------------------------------
def test_resolve_on_demand_from_root_and_unknown_names(make_store):
    s, _ = make_store()
    e = s.resolve("lora")
    assert e.source == str(s.roots[0] / "lora") and e.weights is None
    assert s.resolve("lora") is e  # registered once
    for bad in ("missing", "../lora", "lora/../lora", "org/name"):
        with pytest.raises(UnknownAdapterError):
            s.resolve(bad)


def test_register_replace_bumps_version_and_duplicate_is_refused(make_store, root):
    s, _ = make_store()
    first = s.register("mine", str(root / "lora"))
    with pytest.raises(AdapterError):
        s.register("mine", str(root / "dora"))
    second = s.register("mine", str(root / "dora"), replace=True)
    assert second.version > first.version and s.resolve("mine") is second
    with pytest.raises(AdapterError):
        s.register("bad name!", str(root / "lora"))


def test_check_source_keeps_paths_under_the_roots(make_store, root, tmp_path):
    s, _ = make_store()
    assert s.check_source("lora") == str(root / "lora")
    outside = tmp_path / "outside"
    shutil.copytree(root / "lora", outside)
    with pytest.raises(AdapterNotAllowedError):
        s.check_source(str(outside))
    with pytest.raises(AdapterNotAllowedError):
        s.check_source(str(root / ".." / outside.parent.name / "outside"))
    with pytest.raises(AdapterNotAllowedError):
        s.check_source("someorg/some-adapter")  # Hub disabled by default


# ---- loading -----------------------------------------------------------------------------------------------
def test_single_flight_two_requests_one_load(make_store, gate):
    s, events = make_store()
    e = s.resolve("rslora")
    s.acquire(e)
    f1 = s.ensure_host(e)
    s.acquire(e)
    f2 = s.ensure_host(e)  # the second request for the same cold adapter, while the first load is in progress
    assert f2 is f1 and not f1.done()
    gate.open()
    assert f1.result(timeout=20) is e and f2.result(timeout=20) is e
    assert gate.calls == ["rslora"]
    assert events.count("load", "rslora") == 1
    f3 = s.ensure_host(e)  # warm now: no new load
    assert f3.done() and f3.result() is e and gate.calls == ["rslora"]
    assert e.weights is not None and e.info["type"] == "lora" and e.info["rank"] == 4


def test_load_runs_off_the_calling_thread(make_store, gate):
    s, _ = make_store()
    e = s.resolve("dora")
    fut = s.ensure_host(e)  # returns at once although the load is held
    assert not fut.done()
    gate.open()
    fut.result(timeout=20)
    assert e.weights is not None


def test_failed_load_reports_and_can_be_retried(make_store, root, tmp_path):
    s, _ = make_store(adapter_roots=[str(tmp_path)])
    bad = tmp_path / "broken"
    shutil.copytree(root / "lora", bad)
    (bad / "adapter_config.json").write_text("{not json")
    e = s.resolve("broken")
    with pytest.raises(Exception):
        s.ensure_host(e).result(timeout=20)
    assert e.error and e.weights is None and e.key not in s.host
    assert "broken" not in s.entries  # an on-demand name that cannot load is not listed (/v1/models)
    shutil.copy(root / "lora" / "adapter_config.json", bad / "adapter_config.json")
    again = s.resolve("broken")  # the next request resolves it afresh and retries
    assert again is not e and s.ensure_host(again).result(timeout=20) is again
    assert again.error is None and again.weights is not None


# ---- host tier --------------------------------------------------------------------------------------------
def test_host_tier_is_lru_bounded_by_count(make_store):
    s, events = make_store(max_cpu_loras=2)
    a, b = load(s, "lora"), load(s, "dora")
    assert host_names(s) == ["lora", "dora"]
    c = load(s, "ia3")
    assert host_names(s) == ["dora", "ia3"] and a.weights is None  # least recently used went
    assert events.count("evict_host", "lora") == 1
    s.ensure_host(b)  # a hit refreshes it
    load(s, "lora")
    assert host_names(s) == ["dora", "lora"] and c.weights is None
    assert len(s.host) <= 2


def test_host_tier_byte_budget(make_store):
    s, _ = make_store(max_cpu_loras=10)
    sizes = {}
    for name in ("lora", "dora", "ia3"):
        sizes[name] = load(s, name).weights.nbytes
    s2, _ = make_store(max_cpu_loras=10, max_cpu_lora_bytes=sizes["dora"] + sizes["ia3"])
    for name in ("lora", "dora", "ia3"):
        load(s2, name)
    assert host_names(s2) == ["dora", "ia3"]
    assert sum(e.weights.nbytes for e in s2.host.values()) <= s2.config.max_cpu_lora_bytes


def test_in_flight_and_pinned_adapters_are_never_evicted(make_store, root):
    s, _ = make_store(max_cpu_loras=2)
    busy = load(s, "lora", hold=True)  # a request holds it
    pinned = s.register("keep", str(root / "lora2"), pinned=True)
    s.ensure_host(pinned).result(timeout=20)
    for name in ("dora", "ia3", "rslora"):
        load(s, name)
        assert busy.weights is not None and pinned.weights is not None
        assert "lora" in host_names(s) and "keep" in host_names(s)
    s.release(busy.key)  # the request finished: it becomes evictable again
    load(s, "dora")
    assert busy.weights is None and pinned.weights is not None
    assert host_names(s) == ["keep", "dora"]


def test_bound_restored_after_in_flight_requests_finish(make_store):
    s, _ = make_store(max_cpu_loras=2)
    held = [load(s, name, hold=True) for name in ("lora", "dora", "ia3")]
    assert len(s.host) == 3  # every one is in use: none may go
    for e in held:
        s.release(e.key)
    load(s, "rslora")
    assert len(s.host) <= 2 and "rslora" in host_names(s)


def test_acquire_refreshes_lru_and_counts_hits(make_store):
    s, _ = make_store(max_cpu_loras=2)
    a = load(s, "lora")
    load(s, "dora")
    s.acquire(a)
    s.release(a.key)
    load(s, "ia3")
    assert host_names(s) == ["lora", "ia3"]
    assert a.hits == 1 and a.last_used is not None and a.in_flight == 0


# ---- unload ------------------------------------------------------------------------------------------------
def test_unload_keeps_weights_for_in_flight_requests(make_store):
    s, _ = make_store()
    e = load(s, "lora", hold=True)
    s.acquire(e)  # two requests in flight
    w = e.weights
    assert s.unregister("lora") is e
    assert "lora" not in s.entries and e.key not in s.host
    assert s.weights(e.key) is w  # still served to the requests that started on it
    assert s.release(e.key) is False  # one still in flight
    assert s.weights(e.key) is w
    assert s.release(e.key) is True  # the last one: now the engine may free the device slot
    assert e.weights is None and e.key not in s.retired
    with pytest.raises(UnknownAdapterError):
        s.unregister("lora")


def test_unload_idle_adapter_frees_host_at_once(make_store, root):
    s, _ = make_store()
    e = s.register("idle", str(root / "lora"))
    s.ensure_host(e).result(timeout=20)
    s.unregister("idle")
    assert e.key not in s.host and e.key not in s.retired
    with pytest.raises(UnknownAdapterError):
        s.resolve("idle")


def test_reload_serves_new_version_while_old_one_drains(make_store, root):
    s, _ = make_store()
    old = s.register("x", str(root / "lora"))
    s.acquire(old)
    s.ensure_host(old).result(timeout=20)
    new = s.register("x", str(root / "dora"), replace=True)
    s.ensure_host(new).result(timeout=20)
    assert new.version > old.version
    assert s.weights(old.key).kind == "lora" and s.weights(new.key).kind == "dora"
    assert s.release(old.key) is True and s.weights(new.key).kind == "dora"


def test_unload_during_load_leaves_host_tier_usable(make_store, gate):
    s, _ = make_store()
    e = s.resolve("lora")
    s.acquire(e)  # a request triggered an on-demand load
    fut = s.ensure_host(e)
    s.unregister("lora")  # the operator unloads it while it is still loading
    gate.open()
    fut.result(timeout=20)
    assert s.release(e.key) is True  # the request finished
    assert e.key not in s.host, "retired entry still in the host tier"
    load(s, "dora")  # raises AttributeError: 'NoneType' object has no attribute 'nbytes'
