"""POST /v1/adapters/merge over the real server: a TIES and a DARE merge serve the tokens of PEFT's own merged
adapter (same add_weighted_adapter, same seed, on the real base model); refusals say why and leave nothing."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from support import adapter_root, greedy_tokens, peft_model_for
from .conftest import engine_config, live_server

PROMPT = [1, 40, 41, 42, 43, 44, 45]
STEPS = 6
ROOT = {"alpha": "lora", "beta": "lora2", "rs": "rslora", "dora": "dora"}


@pytest.fixture(scope="module")
def merge_root(adapters, tmp_path_factory):
    return adapter_root(adapters, tmp_path_factory.mktemp("merge-root"), ROOT)


@pytest.fixture(scope="module")
def merge_server(tiny_model_dir, merge_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("adapters-cache")
    config = engine_config(tiny_model_dir, merge_root, max_loras=4, max_cpu_loras=16, adapters_cache=str(cache))
    with live_server(config) as live:
        yield live


def peft_merged(model_dir, root, body: dict, seed: int | None):
    """PEFT's own merge on the real base model: the sources loaded by PeftModel, torch.manual_seed(seed), then
    add_weighted_adapter with the route's parameters, that adapter set."""
    from peft import PeftModel

    sources = body["sources"]
    model = PeftModel.from_pretrained(peft_model_for(model_dir, None), root / sources[0]["name"],
                                      adapter_name=sources[0]["name"])
    for source in sources[1:]:
        model.load_adapter(root / source["name"], adapter_name=source["name"])
    extra = {k: body[k] for k in ("density", "majority_sign_method") if k in body}
    if seed is not None:
        torch.manual_seed(seed)
    model.add_weighted_adapter([s["name"] for s in sources], [s["weight"] for s in sources], "merged",
                               combination_type=body["method"], **extra)
    model.set_adapter("merged")
    return model.eval()


def generate(http, model: str) -> list[int]:
    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": STEPS,
                                           "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("body, seed", [
    ({"method": "ties", "density": 0.5, "majority_sign_method": "total"}, None),
    ({"method": "dare_ties", "density": 0.6, "seed": 7}, 7),
    ({"method": "dare_linear", "density": 0.7}, "drawn"),
])
def test_a_merge_serves_peft_own_merged_adapter(merge_server, merge_root, tiny_model_dir, body, seed):
    body = {"name": f"m-{body['method']}", "sources": [{"name": "alpha", "weight": 0.7},
                                                       {"name": "beta", "weight": 0.5}], **body}
    with merge_server.client() as http:
        r = http.post("/v1/adapters/merge", json=body)
        assert r.status_code == 201, r.text
        made = r.json()
        assert made["name"] == body["name"] and made["tier"] == "host" and made["type"] == "lora"
        assert made["merge"]["method"] == body["method"] and made["merge"]["sources"] == body["sources"]
        seed = made["merge"]["seed"] if seed == "drawn" else seed  # a DARE merge without one reports its seed
        got = generate(http, body["name"])
        assert got != generate(http, "alpha"), "the merge serves one of its sources"
    want, _ = greedy_tokens(peft_merged(tiny_model_dir, merge_root, body, seed), PROMPT, STEPS)
    assert got == want


REFUSED = [  # (body, status, words)
    ({"method": "linear", "sources": [{"name": "alpha"}, {"name": "rs"}]}, 400, ["same r value"]),
    ({"method": "cat", "sources": [{"name": "alpha"}, {"name": "dora"}]}, 400, ["'dora' is DoRA"]),
    ({"method": "cat", "sources": [{"name": "alpha"}, {"name": "nope"}]}, 404, ["'nope'"]),
    ({"method": "linear", "density": 0.5, "sources": [{"name": "alpha"}]}, 400, ["density", "linear"]),
    ({"method": "ties", "sources": [{"name": "alpha"}, {"name": "beta"}]}, 400, ["needs density"]),
    ({"method": "ties", "density": 0.5, "seed": 1, "sources": [{"name": "alpha"}]}, 400, ["seed", "dare"]),
    ({"method": "cat", "sources": [{"name": "alpha", "weight": 101}]}, 400, ["within +-100"]),
    ({"method": "cat", "sources": [{"name": "alpha"}, {"name": "alpha"}]}, 400, ["twice"]),
    ({"method": "model_soup", "sources": [{"name": "alpha"}]}, 400, ["method"]),
    # PEFT runs any one-source merge as linear, its density (or svd_rank) unread
    ({"method": "ties", "density": 0.1, "sources": [{"name": "alpha"}]}, 400, ["one source", "linear"]),
    ({"method": "cat", "svd_driver": "gesvd", "sources": [{"name": "alpha"}]}, 400, ["svd_driver"]),
    ({"method": "cat", "sources": [{"name": "alpha"}, {"name": "beta"}, {"name": "preloaded"}]}, 400,
     ["rank 24", "--max-lora-rank"]),  # the store's own checks hold for a merged adapter
]


@pytest.mark.parametrize("body, status, words", REFUSED)
def test_refused_merges_say_why_and_leave_nothing(merge_server, body, status, words):
    cache = merge_server.engine.merger.directory
    with merge_server.client() as http:
        before = http.get("/v1/adapters").json()["data"]
        if "preloaded" in str(body):
            assert http.post("/v1/adapters", json={"name": "preloaded", "source": "alpha"}).status_code in (201, 409)
            before = http.get("/v1/adapters").json()["data"]
        r = http.post("/v1/adapters/merge", json={"name": "refused", **body})
        assert r.status_code == status, r.text
        assert all(w in r.text for w in words), r.text
        assert [a["name"] for a in http.get("/v1/adapters").json()["data"]] == [a["name"] for a in before]
    assert not (cache / "refused").exists()


def test_merge_names_conflict_unless_replaced_and_old_files_go(merge_server):
    body = {"name": "m-replace", "method": "linear", "sources": [{"name": "alpha", "weight": 0.5},
                                                                {"name": "beta", "weight": 0.5}]}
    with merge_server.client() as http:
        first = http.post("/v1/adapters/merge", json=body)
        assert first.status_code == 201, first.text
        assert http.post("/v1/adapters/merge", json=body).status_code == 409
        second = http.post("/v1/adapters/merge", json={**body, "replace": True,
                                                       "sources": [{"name": "alpha", "weight": -0.5},
                                                                   {"name": "beta", "weight": 0.5}]})
        assert second.status_code == 201, second.text
        assert second.json()["source"] != first.json()["source"]
        directory = merge_server.engine.merger.directory / "m-replace"
        # the first stays while its version is addressable (m-replace@version), and goes with it
        assert sorted(str(v) for v in directory.iterdir()) == sorted([first.json()["source"], second.json()["source"]])
        assert http.delete(f"/v1/adapters/m-replace@{first.json()['version']}").status_code == 200
    assert [str(v) for v in directory.iterdir()] == [second.json()["source"]]


def test_a_merge_that_loses_its_name_to_another_load_meanwhile_is_409(merge_server, merge_root):
    """Both passed the route's check; the load registered first: the merge is the name's conflict (409), and
    its written files go."""
    merger = merge_server.engine.merger
    gate = threading.Event()
    merger.executor.submit(gate.wait, 30)  # the merge thread is busy: the merge below waits its turn
    body = {"name": "m-race", "method": "linear", "sources": [{"name": "alpha", "weight": 0.5},
                                                             {"name": "beta", "weight": 0.5}]}
    out = {}

    def merge():
        with merge_server.client() as http:
            out["merge"] = http.post("/v1/adapters/merge", json=body)

    thread = threading.Thread(target=merge)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while merger.executor._work_queue.qsize() < 1 and time.monotonic() < deadline:  # the merge is queued
            time.sleep(0.01)
        with merge_server.client() as http:
            loaded = http.post("/v1/adapters", json={"name": "m-race", "source": str(merge_root / "alpha")})
        assert loaded.status_code == 201, loaded.text
    finally:
        gate.set()
        thread.join(60)
    assert out["merge"].status_code == 409 and out["merge"].json()["error"]["param"] == "name", out["merge"].text
    assert not (merger.directory / "m-race").exists()
    with merge_server.client() as http:
        assert http.get("/v1/adapters/m-race").json()["source"] == str(merge_root / "alpha")
        assert http.delete("/v1/adapters/m-race").status_code == 200


def test_merge_is_an_admin_route(merge_server):
    with merge_server.client(headers={"X-Forwarded-For": "203.0.113.9"}) as http:
        r = http.post("/v1/adapters/merge", json={"name": "x", "method": "cat", "sources": [{"name": "alpha"}]})
    assert r.status_code == 403


def test_a_source_peft_cannot_rebuild_for_a_merge_is_400_not_500(merge_server, merge_root):
    """layers_pattern without layers_to_transform serves (the weights name their layers) but PEFT refuses to
    build the config for a merge: a 400 with PEFT's reason, nothing registered."""
    import json
    import shutil

    odd = merge_root / "odd-config"
    if not odd.exists():
        shutil.copytree(merge_root / "alpha", odd)
        config = json.loads((odd / "adapter_config.json").read_text())
        (odd / "adapter_config.json").write_text(json.dumps({**config, "layers_pattern": "layers"}))
    with merge_server.client() as http:
        r = http.post("/v1/adapters/merge", json={"name": "odd-merge", "method": "linear",
                                                  "sources": [{"name": "odd-config"}, {"name": "alpha"}]})
        assert r.status_code == 400 and "PEFT could not build" in r.text, r.text
        assert "odd-merge" not in {a["name"] for a in http.get("/v1/adapters").json()["data"]}


def test_a_source_whose_files_changed_since_its_version_loaded_is_refused(merge_server, merge_root, adapters):
    """A merge reads its sources' files: when a registered source's files no longer hold the version it serves
    (overwritten, and not reloaded, or rolled back from), merging them would merge something it does not serve."""
    import shutil

    shutil.copytree(merge_root / "alpha", merge_root / "moving")
    with merge_server.client() as http:
        assert http.post("/v1/adapters", json={"name": "moving", "source": "moving"}).status_code == 201
        shutil.rmtree(merge_root / "moving")
        shutil.copytree(merge_root / "beta", merge_root / "moving")
        r = http.post("/v1/adapters/merge", json={"name": "moved-merge", "method": "linear",
                                                  "sources": [{"name": "moving"}, {"name": "alpha"}]})
        assert r.status_code == 400 and "files changed since the version it serves" in r.text, r.text
        assert "moved-merge" not in {a["name"] for a in http.get("/v1/adapters").json()["data"]}
