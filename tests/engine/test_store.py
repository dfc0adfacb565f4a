"""AdapterStore: names -> sources, the host tier (LRU by count and bytes, in-flight and pinned entries kept),
single-flight loads off the caller's thread, unload that keeps in-flight weights until the last release."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import server.adapters.store as store_module
from server.adapters.store import AdapterStore
from server.config import EngineConfig
from server.errors import (AdapterError, AdapterNotAllowedError, HostMemoryFullError, InvalidRequestError,
                           ReloadInProgressError, UnknownAdapterError)

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
        serving = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)  # what the runner would hold
        s = AdapterStore(cfg, targets, cfg.model, [events], dtype=serving)
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

    def held(self, directory, name, *rest):
        with g.lock:
            g.calls.append(name)
        assert g.release.wait(20), "test gate never opened"
        return original(self, directory, name, *rest)

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
    """The names holding each version of the host tier, LRU order (one name per version in these tests)."""
    return [",".join(sorted(c.names)) for c in s.host.values()]


# ---- names -----------------------------------------------------------------------------------------------
def test_resolve_on_demand_from_root_and_unknown_names(make_store):
    s, _ = make_store()
    e = s.resolve("lora")
    assert e.source == str(s.roots[0] / "lora") and e.weights is None
    assert s.resolve("lora") is e  # registered once
    for bad in ("missing", "../lora", "lora/../lora", "org/name"):
        with pytest.raises(UnknownAdapterError):
            s.resolve(bad)


def test_register_replace_gives_a_new_version_and_duplicate_is_refused(make_store, root):
    s, _ = make_store()
    first = s.register("mine", str(root / "lora"))
    s.ensure_host(first).result(timeout=20)
    with pytest.raises(AdapterError):
        s.register("mine", str(root / "dora"))
    second = s.register("mine", str(root / "dora"), replace=True)
    assert s.resolve("mine") is first and second.version is None  # the name moves once the new one is read
    s.ensure_host(second).result(timeout=20)
    assert s.resolve("mine") is second
    assert second.version != first.version and s.version_list("mine") == [first.version, second.version]
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
    sizes = {name: load(s, name).weights.nbytes for name in ("lora", "dora", "ia3")}
    budget = sizes["dora"] + sizes["ia3"]
    s2, _ = make_store(max_cpu_loras=10, max_cpu_lora_bytes=budget)
    assert sizes["lora"] > budget
    with pytest.raises(AdapterError, match=r"more than the whole host adapter budget \(--max-cpu-lora-bytes"):
        load(s2, "lora")  # could never fit: refused at once, nothing evicted for it
    for name in ("dora", "ia3"):
        load(s2, name)
    assert host_names(s2) == ["dora", "ia3"] and s2.host_bytes() == budget
    load(s2, "rslora")
    assert host_names(s2) == ["ia3", "rslora"]  # the least recently used went to make room
    assert s2.host_bytes() <= budget and s2.budget.reserved == 0


def test_in_flight_and_pinned_adapters_are_never_evicted(make_store, root):
    s, _ = make_store(max_cpu_loras=2)
    busy = load(s, "lora", hold=True)  # a request holds it
    pinned = s.register("keep", str(root / "lora2"), pinned=True)
    s.ensure_host(pinned).result(timeout=20)
    for name in ("dora", "ia3", "rslora"):
        load(s, name)
        assert busy.weights is not None and pinned.weights is not None
        assert "lora" in host_names(s) and "keep" in host_names(s)
    s.release(busy)  # the request finished: it becomes evictable again
    load(s, "dora")
    assert busy.weights is None and pinned.weights is not None
    assert host_names(s) == ["keep", "dora"]


def test_bound_restored_after_in_flight_requests_finish(make_store):
    s, _ = make_store(max_cpu_loras=2)
    held = [load(s, name, hold=True) for name in ("lora", "dora", "ia3")]
    assert len(s.host) == 3  # every one is in use: none may go
    for e in held:
        s.release(e)
    load(s, "rslora")
    assert len(s.host) <= 2 and "rslora" in host_names(s)


def test_acquire_refreshes_lru_and_counts_hits(make_store):
    s, _ = make_store(max_cpu_loras=2)
    a = load(s, "lora")
    load(s, "dora")
    s.acquire(a)
    s.release(a)
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
    assert s.release(e) is None  # one still in flight
    assert s.weights(e.key) is w
    assert s.release(e) == e.key  # the last one: now the engine may free the device slot
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
    assert new.version != old.version
    assert s.weights(old.key).kind == "lora" and s.weights(new.key).kind == "dora"
    assert s.release(old) is None  # the old version stays addressable (x@version) until unloaded or evicted
    assert s.resolve(f"x@{old.version}") is old and s.weights(old.key).kind == "lora"
    assert s.resolve("x") is new and s.weights(new.key).kind == "dora"


def test_unload_during_load_leaves_host_tier_usable(make_store, gate):
    s, _ = make_store()
    e = s.resolve("lora")
    s.acquire(e)  # a request triggered an on-demand load
    fut = s.ensure_host(e)
    s.unregister("lora")  # the operator unloads it while it is still loading
    gate.open()
    fut.result(timeout=20)
    assert s.release(e) == e.key  # the request finished: its version may leave the device
    assert e.key not in s.host, "retired entry still in the host tier"
    load(s, "dora")  # raises AttributeError: 'NoneType' object has no attribute 'nbytes'


# ---- every read re-checks the roots ------------------------------------------------------------------------
@pytest.fixture
def own_root(adapters, tmp_path) -> dict[str, Path]:
    """A root this test may change: swap, intact, third (LoRAs); outside/evil: a valid adapter out of it."""
    root, outside = (tmp_path / "root").resolve(), (tmp_path / "outside").resolve()
    for name, kind in (("swap", "lora"), ("intact", "lora2"), ("third", "rslora")):
        shutil.copytree(adapters[kind], root / name)
    shutil.copytree(adapters["dora"], outside / "evil")
    return {"root": root, "outside": outside}


def test_reread_after_eviction_rechecks_the_roots(make_store, own_root):
    """An adapter evicted from host memory is read again from its path: a directory swapped for a symlink out
    of the root meanwhile is refused (403), while an adapter whose directory is intact reads again fine."""
    root = own_root["root"]
    s, events = make_store(adapter_roots=[str(root)], max_cpu_loras=1)
    swap = load(s, "swap")
    intact = load(s, "intact")  # one host entry: this evicts 'swap'
    assert swap.weights is None and events.count("evict_host", "swap") == 1
    shutil.rmtree(root / "swap")
    os.symlink(own_root["outside"] / "evil", root / "swap")
    with pytest.raises(AdapterNotAllowedError, match=r"swap: resolves outside the adapter roots"):
        s.ensure_host(swap).result(timeout=20)
    assert swap.weights is None and "swap" not in s.entries  # an on-demand name that failed is not listed
    load(s, "third")  # evicts 'intact'
    assert intact.weights is None
    assert s.ensure_host(intact).result(timeout=20).weights.kind == "lora"  # re-read from its intact directory
    with pytest.raises(AdapterNotAllowedError, match="not a directory under an --adapter-root"):
        s.resolve("swap")  # a new request for the name: refused at resolution


@pytest.mark.parametrize("loader", ["process", "thread"])
def test_reads_are_held_to_the_roots_unless_the_path_is_an_operators(loader, make_store, own_root):
    """A source registered without check_source is still refused at read time; an operator's --lora-modules
    path (trusted) is read where it is, as before."""
    s, _ = make_store(adapter_roots=[str(own_root["root"])], adapter_loader=loader)
    evil = str(own_root["outside"] / "evil")
    sneaky = s.register("sneaky", evil)
    with pytest.raises(AdapterNotAllowedError, match="evil: resolves outside the adapter roots"):
        s.ensure_host(sneaky).result(timeout=20)
    operator = s.register("operator", evil, pinned=True, trusted=True)
    assert s.ensure_host(operator).result(timeout=20).weights.kind == "dora"


def test_serving_dtype_refuses_what_would_overflow(make_store, own_root):
    """Serving in float16: an adapter whose B x scaling exceeds 65504 is refused at load; float32 serves it."""
    from safetensors.torch import load_file, save_file

    path = own_root["root"] / "third" / "adapter_model.safetensors"
    sd = load_file(str(path))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = 1e5
    save_file(sd, str(path))
    s16, _ = make_store(adapter_roots=[str(own_root["root"])], dtype="float16", device="cpu")
    assert s16.dtype == torch.float16
    with pytest.raises(AdapterError, match=rf"{key}' times its scaling .* beyond float16's largest finite value"):
        load(s16, "third")
    s32, _ = make_store(adapter_roots=[str(own_root["root"])], dtype="float32", device="cpu")
    assert load(s32, "third").weights is not None


# ---- the host byte budget is hard --------------------------------------------------------------------------
def test_in_flight_adapters_hold_the_budget_then_a_load_gets_503(make_store):
    sizes = {"lora": 65536, "rslora": 13312}  # packed bytes of the session adapters (asserted below)
    s, _ = make_store(max_cpu_loras=10, max_cpu_lora_bytes=sizes["lora"] + sizes["rslora"], cpu_lora_wait=0.2)
    busy = load(s, "lora", hold=True)  # a request holds it: it cannot be evicted
    idle = load(s, "rslora")
    assert (busy.weights.nbytes, idle.weights.nbytes) == (sizes["lora"], sizes["rslora"])
    with pytest.raises(HostMemoryFullError, match=r"no room .* --max-cpu-lora-bytes .* held by adapters with "
                                                   r"requests in flight; retry shortly") as info:
        load(s, "lora2")
    assert info.value.status_code == 503 and info.value.retry_after > 0
    assert idle.weights is not None, "evicted although that could not make room"
    assert s.host_bytes() <= s.config.max_cpu_lora_bytes and s.budget.reserved == 0


def test_a_waiting_load_proceeds_once_bytes_are_freed(make_store):
    s, events = make_store(max_cpu_loras=10, max_cpu_lora_bytes=65536 + 13312, cpu_lora_wait=60)
    busy = load(s, "lora", hold=True)
    waiting = threading.Event()
    wait = s.budget.changed.wait

    def spy(timeout=None):
        waiting.set()
        return wait(timeout)

    s.budget.changed.wait = spy
    other = s.resolve("lora2")
    fut = s.ensure_host(other)
    assert waiting.wait(20), "the load never waited for room"
    assert not fut.done() and s.host_bytes() <= s.config.max_cpu_lora_bytes
    s.release(busy)  # the request finished: 'lora' becomes evictable, the load goes on
    assert fut.result(timeout=20) is other and other.weights is not None
    assert busy.weights is None and events.count("evict_host", "lora") == 1
    assert s.host_bytes() <= s.config.max_cpu_lora_bytes


def test_adapter_larger_than_the_whole_budget_is_400_at_once(make_store):
    s, _ = make_store(max_cpu_lora_bytes=20000, cpu_lora_wait=3600)  # a wait would hang the test
    with pytest.raises(AdapterError, match=r"lora/adapter_model.safetensors: needs \d+ bytes of host memory, "
                                           r"more than the whole host adapter budget \(--max-cpu-lora-bytes 20000\)"):
        load(s, "lora")


# ---- failed on-demand loads -------------------------------------------------------------------------------
def test_failed_on_demand_load_is_unlisted_but_remembered(make_store, root, tmp_path):
    s, _ = make_store(adapter_roots=[str(tmp_path)])
    shutil.copytree(root / "lora", tmp_path / "broken")
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError):
        load(s, "broken")
    failure = s.failure("broken")
    assert "broken" not in s.entries and failure is not None and failure.status_code == 400
    assert "adapter_config.json: not valid JSON" in failure.error and failure.source.endswith("broken")
    assert "failed at" in failure.describe() and s.failure("lora") is None
    shutil.copy(root / "lora" / "adapter_config.json", tmp_path / "broken" / "adapter_config.json")
    load(s, "broken")
    assert s.failure("broken") is None  # loaded now: nothing to explain any more


# ---- versions ------------------------------------------------------------------------------------------------
def reload(s: AdapterStore, name: str, source) -> object:
    e = s.register(name, str(source), replace=True)
    s.ensure_host(e).result(timeout=20)
    return s.entries[name]


def test_same_content_under_two_names_is_one_version_held_once(make_store, root, tmp_path):
    s, _ = make_store(adapter_roots=[str(root), str(tmp_path)])
    shutil.copytree(root / "lora", tmp_path / "copy")
    a = reload(s, "a", root / "lora")
    one_copy = s.held_bytes()
    b = reload(s, "b", tmp_path / "copy")  # other name, other directory, same files
    assert a.version == b.version and a.content is b.content and a.weights is b.weights
    assert list(s.host) == [a.key] and s.held_bytes() == one_copy  # one copy in host memory
    assert s.versions[a.key].names == {"a", "b"}
    s.unregister("a")  # still held by b
    assert s.weights(b.key) is b.weights and s.known(b.key)
    s.unregister("b")
    assert not s.known(b.key) and s.held_bytes() == 0


def test_reload_pins_and_rollback(make_store, root):
    s, _ = make_store()
    v1 = reload(s, "m", root / "lora")
    v2 = reload(s, "m", root / "lora2")
    assert s.version_list("m") == [v1.version, v2.version] and s.resolve("m") is v2
    assert s.resolve(f"m@{v1.version}") is v1 and s.resolve(f"m@{v2.version}") is v2
    with pytest.raises(UnknownAdapterError, match="has no version '000000000000'") as caught:
        s.resolve("m@000000000000")
    assert caught.value.status_code == 404
    same = reload(s, "m", root / "lora2")  # the same content again: nothing changes
    assert same is v2 and s.version_list("m") == [v1.version, v2.version]
    assert s.rollback("m", v1.version) is v1 and s.resolve("m") is v1
    with pytest.raises(UnknownAdapterError):
        s.rollback("m", "000000000000")
    with pytest.raises(AdapterError, match="is the current version"):
        s.unregister("m", v1.version)
    assert s.unregister("m", v2.version) is v2
    assert s.version_list("m") == [v1.version] and not s.known(v2.key)
    with pytest.raises(UnknownAdapterError):
        s.resolve(f"m@{v2.version}")


def test_failed_reload_keeps_the_name_on_its_version(make_store, root, tmp_path):
    s, _ = make_store(adapter_roots=[str(root), str(tmp_path)])
    v1 = reload(s, "m", root / "lora")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    bad = s.register("m", str(tmp_path / "bad"), replace=True)
    with pytest.raises(AdapterError):
        s.ensure_host(bad).result(timeout=20)
    s.restore(bad, v1)  # what AsyncEngine.load_adapter does
    assert s.resolve("m") is v1 and s.version_list("m") == [v1.version]
    bad = s.register("m", str(tmp_path / "bad"), replace=True)
    with pytest.raises(ReloadInProgressError):  # one reload of a name at a time: the second waits its turn
        s.register("m", str(root / "lora2"), replace=True)
    with pytest.raises(AdapterError):
        s.ensure_host(bad).result(timeout=20)
    assert s.resolve("m") is v1 and not s.catalog.pending  # the failed load itself put the name back
    v2 = reload(s, "m", root / "lora2")  # the next reload goes ahead
    assert s.resolve("m") is v2 and s.version_list("m") == [v1.version, v2.version]


def test_an_evicted_older_version_is_forgotten_the_current_one_reread(make_store, root):
    s, _ = make_store(max_cpu_loras=1)
    v1 = reload(s, "m", root / "lora")
    v2 = reload(s, "m", root / "lora2")  # one host entry: v1 (no longer current, idle) goes
    assert list(s.host) == [v2.key] and s.version_list("m") == [v2.version]
    with pytest.raises(UnknownAdapterError):
        s.resolve(f"m@{v1.version}")
    load(s, "dora")  # evicts v2, which stays the name's current version, read again on demand
    assert v2.weights is None and s.version_list("m") == [v2.version]
    assert s.ensure_host(s.resolve("m")).result(timeout=20) is v2 and v2.weights is not None


def test_a_reread_that_finds_other_files_is_refused(make_store, root, tmp_path):
    s, _ = make_store(adapter_roots=[str(tmp_path)], max_cpu_loras=1)
    shutil.copytree(root / "lora", tmp_path / "swap")
    shutil.copytree(root / "dora", tmp_path / "other")
    swap = reload(s, "swap", tmp_path / "swap")
    reload(s, "other", tmp_path / "other")  # evicts swap
    shutil.rmtree(tmp_path / "swap")
    shutil.copytree(root / "lora2", tmp_path / "swap")
    with pytest.raises(AdapterError, match=f"its files changed since version {swap.version}"):
        s.ensure_host(swap).result(timeout=20)


def test_an_on_demand_name_rereads_its_files_as_a_reload(make_store, root, tmp_path):
    """An on-demand adapter out of host memory is read again by its next request: the same files give its
    version back (history kept), changed files its new version (the old one, unreadable now, forgotten)
    instead of failing that request and forgetting the name; a re-read that fails forgets the name, as any
    failed on-demand load does (it holds no version it can read)."""
    s, _ = make_store(adapter_roots=[str(tmp_path)], max_cpu_loras=1)
    shutil.copytree(root / "lora", tmp_path / "swap")
    shutil.copytree(root / "dora", tmp_path / "other")
    v1 = load(s, "swap")
    load(s, "other")  # evicts swap: its current version stays, weightless
    again = load(s, "swap", hold=True)  # the same files: the same version, the same entry
    assert s.entries["swap"] is v1 and again.version == v1.version and s.version_list("swap") == [v1.version]
    assert v1.in_flight == 1 and again.in_flight == 0  # the request bound to the re-read counts on the name
    s.release(again)
    assert v1.in_flight == 0 and v1.content.in_flight == 0
    load(s, "other")
    shutil.rmtree(tmp_path / "swap")
    shutil.copytree(root / "lora2", tmp_path / "swap")
    v2 = load(s, "swap")
    assert v2.version != v1.version and v2.weights is not None and s.entries["swap"] is v2
    assert s.version_list("swap") == [v2.version] and not s.known(v1.key)
    load(s, "other")
    (tmp_path / "swap" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError):
        load(s, "swap")  # a re-read that fails: the name has no version it can read, and is forgotten
    assert "swap" not in s.entries and not s.catalog.pending and s.failure("swap") is not None
    shutil.rmtree(tmp_path / "swap")
    shutil.copytree(root / "lora", tmp_path / "swap")
    assert load(s, "swap").version == v1.version  # the next request loads it afresh


def test_a_merged_version_forgotten_on_eviction_takes_its_files_with_it(make_store, root, tmp_path, tiny_model_dir):
    from server.adapters.merge import AdapterMerger

    s, _ = make_store(max_cpu_loras=1)
    merger = AdapterMerger(s, None, tmp_path / "merged", 1 << 30)
    s.observers.append(merger)
    older, newer = tmp_path / "merged" / "m" / "aaa", tmp_path / "merged" / "m" / "bbb"
    shutil.copytree(root / "lora", older)
    shutil.copytree(root / "lora2", newer)
    for directory in (older, newer):  # what merge_adapter registers: a trusted path under the merger's directory
        s.ensure_host(s.register("m", str(directory), replace=True, trusted=True)).result(timeout=20)
    merger.executor.submit(lambda: None).result(timeout=20)  # the merge thread has run what was queued
    assert not older.exists() and newer.exists() and s.version_list("m") == [s.entries["m"].version]
    load(s, "dora")  # evicts the current version: it stays (read again from its files), and so do they
    merger.executor.submit(lambda: None).result(timeout=20)
    assert newer.exists()
    merger.close()


def test_in_flight_request_keeps_its_version_through_reload_and_unload(make_store, root):
    s, _ = make_store()
    v1 = reload(s, "m", root / "lora")
    s.acquire(v1)  # a request started on v1
    reload(s, "m", root / "lora2")
    s.unregister("m")
    assert v1.key in s.retired and s.weights(v1.key).kind == "lora"
    assert s.release(v1) == v1.key and v1.weights is None and not s.retired


def test_traffic_split_routes_by_user_and_is_checked(make_store, root):
    s, _ = make_store()
    v1 = reload(s, "m", root / "lora")
    v2 = reload(s, "m", root / "lora2")
    with pytest.raises(InvalidRequestError, match="sum to 100"):
        s.set_split("m", {v1.version: 50, v2.version: 40})
    with pytest.raises(InvalidRequestError, match="has no version"):
        s.set_split("m", {v1.version: 50, "000000000000": 50})
    with pytest.raises(UnknownAdapterError):
        s.set_split("nope", {v1.version: 100})
    s.set_split("m", {v1.version: 80, v2.version: 20})
    picked = [s.resolve("m", f"user-{i}") for i in range(400)]
    assert {e for e in picked} == {v1, v2}
    assert all(s.resolve("m", f"user-{i}") is e for i, e in enumerate(picked))  # sticky
    with pytest.raises(AdapterError, match="in its traffic split"):
        s.unregister("m", v1.version)
    s.set_split("m", None)
    assert all(s.resolve("m", f"user-{i}") is v2 for i in range(50))  # back to the current version


def test_versions_in_a_traffic_split_stay_in_host_memory(make_store, root):
    s, _ = make_store(max_cpu_loras=2)
    v1 = reload(s, "m", root / "lora")
    v2 = reload(s, "m", root / "lora2")
    s.set_split("m", {v1.version: 50, v2.version: 50})
    for name in ("dora", "ia3", "rslora"):  # more than the tier holds
        load(s, name)
    assert {v1.key, v2.key} <= set(s.host) and s.version_list("m") == [v1.version, v2.version]
    s.set_split("m", None)
    load(s, "lora2")  # now the older one may go, and is forgotten with it
    assert v1.key not in s.host and s.version_list("m") == [v2.version]


def test_a_current_version_out_of_host_memory_is_forgotten_when_new_files_replace_it(make_store, root, tmp_path):
    """A name's current version evicted from host memory, then reloaded in place with new files: the old
    version can never be read again (its directory holds the new files), so it is forgotten then, as an older
    version leaving host memory is; it used to stay listed, splittable and pinnable, failing every read."""
    s, _ = make_store(max_cpu_loras=1, adapter_roots=[str(tmp_path), str(root)])
    shutil.copytree(root / "lora", tmp_path / "moving")
    first = s.register("moving", str(tmp_path / "moving"))
    s.ensure_host(first).result(timeout=20)
    s.ensure_host(s.register("other", str(root / "dora"))).result(timeout=20)  # evicts moving's only version
    assert first.weights is None and s.version_list("moving") == [first.version]
    shutil.rmtree(tmp_path / "moving")
    shutil.copytree(root / "lora2" if (root / "lora2").exists() else root / "ia3", tmp_path / "moving")
    second = s.register("moving", str(tmp_path / "moving"), replace=True)
    s.ensure_host(second).result(timeout=20)
    assert s.version_list("moving") == [second.version] and second.version != first.version


def test_an_adapter_root_that_is_not_a_directory_is_warned_of(make_store, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="server.adapters.sources"):
        make_store(adapter_roots=[str(tmp_path / "typo")])
    assert any("is not a directory" in r.getMessage() and "typo" in r.getMessage() for r in caplog.records)
