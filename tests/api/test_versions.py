"""Adapter versions and canary over HTTP: a name reloaded with other files gets a new version while the old one
stays addressable as name@version (each answering its own PEFT tokens), a request in flight finishes on the
version it started with, rollback, one copy for the same content under two names, traffic splits (sticky per
user), x-adapter-version on every adapter response, and the per-version and residency series in /metrics."""
from __future__ import annotations

import shutil
import threading
import time

import pytest

from server.adapters.versions import pick_version
from server.api.settings import ServerConfig
from support import greedy_tokens, peft_mixture_for, peft_model_for
from .conftest import engine_config, live_server
from .helpers import metric_value, samples, wait_for

PROMPT = [1, 40, 41, 42, 43, 44, 45]
STEPS = 5
HELD_STEPS = 9  # the request parked mid-generation (Hold) asks for this many tokens


class Hold:
    """Parks the step thread when a request for ``adapter`` asking HELD_STEPS tokens has 2 of them, until ``go``:
    that request is then provably in flight while the test reloads its adapter."""

    def __init__(self, adapter: str):
        self.adapter = adapter
        self.reached, self.go = threading.Event(), threading.Event()

    def on_token(self, req, now):
        uses = getattr(req, "uses", ())
        if uses and uses[0].entry.name == self.adapter and req.params.max_tokens == HELD_STEPS \
                and len(req.output_token_ids) == 2:
            self.reached.set()
            self.go.wait(30)


@pytest.fixture(scope="module")
def files(adapters, tmp_path_factory):
    """root/: 'swap' (lora's files now; the tests overwrite it), twin-a and twin-b (both lora2's files)."""
    root = tmp_path_factory.mktemp("versions-root")
    shutil.copytree(adapters["lora"], root / "swap")
    for twin in ("twin-a", "twin-b"):
        shutil.copytree(adapters["lora2"], root / twin)
    return root


@pytest.fixture(scope="module")
def vserver(tiny_model_dir, files):
    config = engine_config(tiny_model_dir, files, max_loras=2, max_cpu_loras=8)
    with live_server(config, ServerConfig(shutdown_timeout=2)) as live:
        yield live


@pytest.fixture(scope="module")
def want(tiny_model_dir, adapters):
    """PEFT's greedy tokens for PROMPT per adapter directory kind (the oracle)."""
    return {kind: greedy_tokens(peft_model_for(tiny_model_dir, adapters[kind]), PROMPT, HELD_STEPS)[0]
            for kind in ("lora", "lora2")}


def vserver_model(server):
    return server.engine.config.model


def complete(http, model, steps=STEPS, **fields):
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": steps,
                                              "temperature": 0, "return_token_ids": True, **fields})


def tokens(response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def overwrite(root, name, src) -> None:
    shutil.rmtree(root / name)
    shutil.copytree(src, root / name)


def test_reload_pin_in_flight_and_rollback(vserver, files, adapters, want):
    hold = Hold("swap")
    vserver.engine.add_observer(hold)
    with vserver.client() as http:
        first = http.put("/v1/adapters/swap", json={"source": str(files / "swap")})
        assert first.status_code == 200, first.text
        v1 = first.json()["version"]
        assert len(v1) == 12 and first.json()["versions"] == [v1]
        r = complete(http, "swap")
        assert tokens(r) == want["lora"][:STEPS] and r.headers["x-adapter-version"] == v1

        held = {}
        worker = threading.Thread(target=lambda: held.update(r=complete(vserver.client(), "swap", HELD_STEPS)))
        worker.start()
        assert hold.reached.wait(30), "the held request never started"
        overwrite(files, "swap", adapters["lora2"])  # TRL's way: new files at the same path, reloaded in place
        inplace = http.post("/v1/load_lora_adapter", json={"lora_name": "swap", "lora_path": str(files / "swap"),
                                                           "load_inplace": True})
        assert inplace.status_code == 200, inplace.text
        v2 = http.get("/v1/adapters/swap").json()["version"]
        assert v2 != v1
        hold.go.set()
        worker.join(30)
        assert tokens(held["r"]) == want["lora"]  # finished on the version it started with
        assert held["r"].headers["x-adapter-version"] == v1

        assert tokens(complete(http, "swap")) == want["lora2"][:STEPS]
        pinned = complete(http, f"swap@{v1}")
        assert tokens(pinned) == want["lora"][:STEPS] and pinned.headers["x-adapter-version"] == v1
        assert complete(http, "swap").headers["x-adapter-version"] == v2
        listed = http.get("/v1/adapters/swap/versions").json()["data"]
        assert [(v["version"], v["current"]) for v in listed] == [(v1, False), (v2, True)]
        assert {m["id"]: m for m in http.get("/v1/models").json()["data"]}["swap"]["version"] == v2

        back = http.post("/v1/adapters/swap/rollback", json={"version": v1})
        assert back.status_code == 200 and back.json()["version"] == v1
        assert tokens(complete(http, "swap")) == want["lora"][:STEPS]
        assert http.post("/v1/adapters/swap/rollback", json={"version": v2}).json()["version"] == v2
        assert tokens(complete(http, "swap")) == want["lora2"][:STEPS]


def test_pins_in_mixtures_and_tgi_and_unknown_versions(vserver, files, adapters, tiny_model_dir):
    with vserver.client() as http:
        versions = [v["version"] for v in http.get("/v1/adapters/swap/versions").json()["data"]]
        old, current = versions[0], versions[-1]
        assert old != current, "needs test_reload_pin_in_flight_and_rollback's two versions"
        mix = complete(http, None, adapters=[{"name": f"swap@{old}", "scale": 0.5}, {"name": "twin-a", "scale": 0.5}])
        peft = peft_mixture_for(tiny_model_dir, [(adapters["lora"], 0.5), (adapters["lora2"], 0.5)])
        assert tokens(mix) == greedy_tokens(peft, PROMPT, STEPS)[0]
        twin = http.get("/v1/adapters/twin-a").json()["version"]
        assert mix.headers["x-adapter-version"] == f"swap@{old},twin-a@{twin}"
        tgi = http.post("/generate", json={"inputs": "hello", "parameters": {"adapter_id": f"swap@{old}",
                                                                             "max_new_tokens": 3}})
        assert tgi.status_code == 200 and tgi.headers["x-adapter-version"] == old
        assert "x-adapter-version" not in complete(http, "tiny-llama").headers  # the base model: none

        for bad in (complete(http, "swap@000000000000"),
                    complete(http, None, adapters=[{"name": "swap@000000000000"}]),
                    http.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "swap@000000000000"}}),
                    http.post("/v1/adapters/swap/rollback", json={"version": "000000000000"})):
            assert bad.status_code == 404, bad.text
        assert "has no version '000000000000'" in complete(http, "swap@000000000000").json()["error"]["message"]
        assert http.get("/v1/adapters/nope/versions").status_code == 404

        assert http.delete(f"/v1/adapters/swap@{current}").status_code == 400  # the current one: roll back first
        assert http.delete(f"/v1/adapters/swap@{old}").status_code == 200
        assert complete(http, f"swap@{old}").status_code == 404
        assert http.delete(f"/v1/adapters/swap@{old}").status_code == 404


def test_same_content_under_two_names_is_one_version_and_one_copy(vserver, files):
    store = vserver.engine.engine.store
    with vserver.client() as http:
        a = http.put("/v1/adapters/twin-a", json={"source": str(files / "twin-a")}).json()
        b = http.put("/v1/adapters/twin-b", json={"source": str(files / "twin-b")}).json()
        assert a["version"] == b["version"]
        assert tokens(complete(http, "twin-a")) == tokens(complete(http, "twin-b"))
        with store.lock:
            key = store.entries["twin-a"].key
            assert store.entries["twin-b"].key == key and len(key) == 64 and key.startswith(a["version"])
            assert sum(1 for c in store.host.values() if c.version == a["version"]) == 1
            assert store.entries["twin-a"].weights is store.entries["twin-b"].weights
            assert store.versions[key].names >= {"twin-a", "twin-b"}
        # one slot for both names: a mixture of the two at 0.5 each is the adapter at 1.0 (PEFT agrees)
        mix = complete(http, None, adapters=[{"name": "twin-a", "scale": 0.5}, {"name": "twin-b", "scale": 0.5}])
        assert tokens(mix) == tokens(complete(http, "twin-a"))
        twice = peft_mixture_for(vserver_model(vserver), [(files / "twin-a", 0.5), (files / "twin-b", 0.5)])
        assert tokens(mix) == greedy_tokens(twice, PROMPT, STEPS)[0]
        listed = {x["name"]: x for x in http.get("/v1/adapters").json()["data"]}
        for name in ("twin-a", "twin-b"):
            item = listed[name]
            assert item["version"] == a["version"] and item["tier"] in ("device", "host")
            assert item["size_bytes"] > 0 and item["pinned"] is False and item["in_flight"] == 0


def test_canary_split_sticky_per_user_and_refusals(vserver, files, adapters, want):
    with vserver.client() as http:
        overwrite(files, "swap", adapters["lora"])
        assert http.put("/v1/adapters/swap", json={"source": str(files / "swap")}).status_code == 200
        versions = [v["version"] for v in http.get("/v1/adapters/swap/versions").json()["data"]]
        assert len(versions) == 2
        lora = http.get("/v1/adapters/swap").json()["version"]
        lora2 = next(v for v in versions if v != lora)
        for bad in ({lora: 80, lora2: 10}, {lora: 80, "000000000000": 20}, {lora: 120, lora2: -20}):
            r = http.put("/v1/adapters/swap/traffic", json={"split": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "split", r.text
        assert http.put("/v1/adapters/nope/traffic", json={"split": {lora: 100}}).status_code == 404

        split = {lora: 80, lora2: 20}
        r = http.put("/v1/adapters/swap/traffic", json={"split": split})
        assert r.status_code == 200 and r.json()["split"] == {lora: 80.0, lora2: 20.0}
        assert http.get("/v1/adapters/swap").json()["traffic"] == {lora: 80.0, lora2: 20.0}
        users = {f"user-{i}": pick_version(r.json()["split"], "swap", f"user-{i}") for i in range(12)}
        assert set(users.values()) == {lora, lora2}, "pick users that reach both arms"
        oracle = {lora: want["lora"][:STEPS], lora2: want["lora2"][:STEPS]}
        for user, version in users.items():
            for _ in range(2):  # sticky: the same user lands on the same version
                r = complete(http, "swap", user=user)
                assert r.headers["x-adapter-version"] == version and tokens(r) == oracle[version]
            by_header = http.post("/v1/completions", headers={"x-user-id": user},
                                  json={"model": "swap", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
            assert by_header.headers["x-adapter-version"] == version
        with http.stream("POST", "/v1/completions", json={"model": "swap", "prompt": PROMPT, "max_tokens": 2,
                                                          "stream": True, "user": user}) as streamed:
            assert streamed.status_code == 200 and streamed.headers["x-adapter-version"] == users[user]
            assert "[DONE]" in streamed.read().decode()
        assert http.delete(f"/v1/adapters/swap@{lora2}").status_code == 400  # in the split

        text = http.get("/metrics").text
        for version in (lora, lora2):
            assert metric_value(http, "swapserve:adapter_version_requests_total", adapter="swap",
                                version=version) > 0, text

        # without a user the choice is per HTTP request: all n choices of one request read the same version
        assert http.put("/v1/adapters/swap/traffic", json={"split": {lora: 50, lora2: 50}}).status_code == 200
        for _ in range(6):
            r = complete(http, "swap", n=3)
            assert r.status_code == 200, r.text
            version = r.headers["x-adapter-version"]
            assert [c["token_ids"] for c in r.json()["choices"]] == [oracle[version]] * 3

        assert http.delete("/v1/adapters/swap/traffic").json()["split"] is None
        assert {complete(http, "swap", user=u).headers["x-adapter-version"] for u in users} == {lora}


def test_residency_gauges_and_counters(vserver):
    with vserver.client() as http:
        assert complete(http, "twin-a").status_code == 200
        series = samples(http)
        loaded = [s for s in series if s.name == "vllm:lora_adapter_loaded"]
        levels = {(s.labels["adapter_name"], s.labels["level"]) for s in loaded}
        assert ("twin-a", "gpu") in levels, levels
        assert all(s.labels["level"] in ("gpu", "cpu") and s.labels["pinned"] in ("true", "false") for s in loaded)
        assert any(name.startswith("swap@") for name, _ in levels) or ("swap", "gpu") in levels \
            or ("swap", "cpu") in levels
        assert metric_value(http, "swapserve:adapter_loads_total", tier="host") >= 2
        assert metric_value(http, "swapserve:adapter_loads_total", tier="device") >= 2
        device_ratio = metric_value(http, "swapserve:adapter_hit_ratio", tier="device")
        host_ratio = metric_value(http, "swapserve:adapter_hit_ratio", tier="host")
        assert 0 < device_ratio < 1 and 0 < host_ratio < 1


def test_unpinning_by_registering_again_unpins_the_device_slot(vserver, files):
    """The console unpins by registering the same source with pinned false: the same content, so no new version;
    its device slot must stop being pinned too (it stayed pinned, and the LRU skipped it forever)."""
    manager = vserver.engine.engine.runner.manager
    with vserver.client() as http:
        assert http.post("/v1/adapters", json={"name": "twin-a", "source": str(files / "twin-a"), "pinned": True,
                                               "replace": True}).status_code in (200, 201)
        assert complete(http, "twin-a").status_code == 200
        key = vserver.engine.engine.store.entries["twin-a"].key
        assert key in manager.pinned
        again = http.post("/v1/adapters", json={"name": "twin-a", "source": str(files / "twin-a"), "pinned": False,
                                                "replace": True})
        assert again.status_code in (200, 201) and again.json()["pinned"] is False, again.text
        assert wait_for(lambda: key not in manager.pinned)


def test_an_older_version_of_a_pinned_name_is_never_pinned_again(vserver, files, adapters):
    """Pinning holds a name's current version: a request for name@older (after a reload) reads that version
    without pinning its slot again (it was, with nothing left to unpin it)."""
    shutil.copytree(adapters["lora"], files / "pin-old")
    manager = vserver.engine.engine.runner.manager
    with vserver.client() as http:
        first = http.post("/v1/adapters", json={"name": "pin-old", "source": str(files / "pin-old"), "pinned": True})
        assert first.status_code == 201, first.text
        v1 = first.json()["version"]
        assert complete(http, "pin-old").status_code == 200
        old_key = vserver.engine.engine.store.entries["pin-old"].key
        overwrite(files, "pin-old", adapters["lora2"])
        reload = http.put("/v1/adapters/pin-old", json={"source": str(files / "pin-old"), "pinned": True})
        assert reload.status_code == 200, reload.text
        assert wait_for(lambda: old_key not in manager.pinned)
        assert complete(http, f"pin-old@{v1}").status_code == 200
        assert old_key not in manager.pinned


@pytest.mark.parametrize("new_files", ["broken", "lora2"])
def test_requests_during_a_reload_read_the_version_the_name_serves(vserver, files, adapters, want, new_files):
    """The name moves once the new version has loaded (README): a request arriving while the reload loads reads
    the version the name serves, and a reload that fails leaves the name, and such requests, on it (they were
    bound to the unloaded new entry, and failed with it)."""
    import time

    shutil.copytree(adapters["lora"], files / f"window-{new_files}")
    name = f"window-{new_files}"
    with vserver.client() as http:
        v1 = http.put(f"/v1/adapters/{name}", json={"source": str(files / name)}).json()["version"]
        if new_files == "broken":
            (files / name / "adapter_config.json").write_text("{broken")
        else:
            overwrite(files, name, adapters["lora2"])
        store, result = vserver.engine.engine.store, {}
        store.executor.submit(time.sleep, 1.0)  # the loader is busy (a large adapter): the reload waits
        reload = threading.Thread(target=lambda: result.update(r=vserver.client().post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(files / name), "load_inplace": True})))
        reload.start()
        time.sleep(0.3)
        during = complete(http, name)
        reload.join(30)
        assert tokens(during) == want["lora"][:STEPS] and during.headers["x-adapter-version"] == v1
        assert result["r"].status_code == (400 if new_files == "broken" else 200), result["r"].text
        after = complete(http, name)
        assert tokens(after) == want["lora" if new_files == "broken" else "lora2"][:STEPS]


def test_a_second_reload_while_one_is_loading_is_409(vserver, files, adapters, want):
    """One reload of a name at a time: the second is refused (409, retry) rather than replacing the first,
    whose call then reported a version the name never moved to; once the first has loaded, the name is on it."""
    name = "twice"
    shutil.copytree(adapters["lora"], files / name)
    store, result, gate = vserver.engine.engine.store, {}, threading.Event()
    with vserver.client() as http:
        assert http.put(f"/v1/adapters/{name}", json={"source": str(files / name)}).status_code == 200
        overwrite(files, name, adapters["lora2"])
        store.executor.submit(gate.wait, 30)  # the loader is busy: the first reload stays pending
        body = {"lora_name": name, "lora_path": str(files / name), "load_inplace": True}
        first = threading.Thread(target=lambda: result.update(r=vserver.client().post("/v1/load_lora_adapter",
                                                                                       json=body)))
        first.start()
        try:
            deadline = time.monotonic() + 30
            while name not in store.catalog.pending and time.monotonic() < deadline:
                time.sleep(0.01)
            second = http.post("/v1/load_lora_adapter", json=body)
            put = http.put(f"/v1/adapters/{name}", json={"source": str(files / name)})
        finally:
            gate.set()
            first.join(30)
        assert second.status_code == 409 and "still loading" in second.json()["error"]["message"], second.text
        assert put.status_code == 409, put.text
        assert result["r"].status_code == 200, result["r"].text
        assert tokens(complete(http, name)) == want["lora2"][:STEPS]
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 200  # the next one goes ahead
