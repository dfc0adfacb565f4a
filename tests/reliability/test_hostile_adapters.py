"""Hostile adapters over HTTP: every one is refused with a 4xx and a message naming the reason, through the
admin routes (/v1/load_lora_adapter, /v1/adapters) and on demand (`model=<name>`, TGI `adapter_id`); no pickle
is ever unpickled, nothing outside the adapter roots is loaded (also when a directory turns into a symlink after it
was loaded), no NaN/Inf or half-precision overflow reaches a slot, nothing oversize is fetched from the Hub, admin
routes refuse proxied requests without an admin key, and a normal request still gets the same answer.

The format-level corpus (every corruption of a PEFT directory) lives in tests/adapters/test_formats.py; this
file checks that the refusals reach the client intact, with the right status, whatever route asked.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from api.conftest import engine_config, live_server
from api.helpers import samples
from server.api.settings import ServerConfig

from support import distinct_copy
from .conftest import (BASE, NORMAL, copy_adapter, edit_config, error_message, live_pickle, make_lora,
                       random_bytes, rewrite_tensors, safetensors_header, still_serves)

Q0 = "base_model.model.model.layers.0.self_attn.q_proj."
FILLERS = [f"fill-{i}" for i in range(4)]  # as many as the host tier holds (engine_config: max_cpu_loras=4)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def corpus(tiny_model_dir, adapters, tmp_path_factory) -> dict[str, Path]:
    """root/: one good adapter and one directory per hostile case; outside/: a valid adapter the root's symlinks
    point at (loading it would succeed, so a refusal proves it was not read); marker: what the pickles create."""
    base = tmp_path_factory.mktemp("hostile")
    root, outside, marker = base / "root", base / "outside", base / "pwned"
    root.mkdir()
    lora = adapters["lora"]  # r=8 on every linear layer of the tiny Llama (hidden 64)
    copy_adapter(lora, outside / "good")
    copy_adapter(lora, root / "good")
    payload = live_pickle(marker, base / "control")

    d = copy_adapter(lora, root / "pickle-only")
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(payload)
    d = copy_adapter(lora, root / "pickle-named-safetensors")
    (d / WEIGHTS).write_bytes(payload)
    d = copy_adapter(lora, root / "truncated")
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:1000])
    d = copy_adapter(lora, root / "corrupt")
    (d / WEIGHTS).write_bytes(random_bytes(4096))
    d = copy_adapter(lora, root / "wrong-shape")
    rewrite_tensors(d, lambda sd: {**sd, Q0 + "lora_A.weight": sd[Q0 + "lora_A.weight"][:, :32].contiguous()})
    make_lora(tiny_model_dir, root / "rank-over-limit", r=16, seed=3)
    d = copy_adapter(lora, root / "no-config")
    (d / CONFIG).unlink()
    d = copy_adapter(lora, root / "invalid-config")
    (d / CONFIG).write_text("{'peft_type': 'LORA',")
    d = copy_adapter(lora, root / "unknown-peft-type")
    edit_config(d, peft_type="EVIL_TUNING")
    d = copy_adapter(lora, root / "modules-to-save")
    edit_config(d, modules_to_save=["lm_head"])
    d = copy_adapter(lora, root / "huge-tensors")
    (d / WEIGHTS).write_bytes(safetensors_header(
        {Q0 + "lora_A.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}},
        b"\0" * 16))
    d = copy_adapter(lora, root / "huge-header")
    (d / WEIGHTS).write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    os.symlink(outside / "good", root / "symlinked-dir")
    d = copy_adapter(lora, root / "symlinked-weights")
    (d / WEIGHTS).unlink()
    os.symlink(outside / "good" / WEIGHTS, d / WEIGHTS)
    d = copy_adapter(lora, root / "symlinked-config")
    (d / CONFIG).unlink()
    os.symlink(outside / "good" / CONFIG, d / CONFIG)
    rewrite_tensors(copy_adapter(lora, root / "nan-weights"), set_first(Q0 + "lora_B.weight", float("nan")))
    rewrite_tensors(copy_adapter(lora, root / "inf-weights"), set_first(Q0 + "lora_A.weight", float("-inf")))
    # lora: r=8, alpha=16, so the slot holds B x 2: 40000 fits float16 (max 65504), 80000 does not
    rewrite_tensors(copy_adapter(lora, root / "fp16-overflow"), set_first(Q0 + "lora_B.weight", 40000.0))
    for name in ("swap-me", *FILLERS):
        distinct_copy(lora, root / name)  # each its own version, so the fillers evict swap-me
    return {"root": root, "outside": outside, "marker": marker, "base": base}


@pytest.fixture(scope="module")
def hostile_server(tiny_model_dir, corpus):
    """Adapter root = the corpus; Hub adapters on, but only for 'trusted-org'; ranks up to 8."""
    config = engine_config(tiny_model_dir, corpus["root"], max_lora_rank=8, allow_hub_adapters=True,
                           hub_adapter_orgs=["trusted-org"])
    with live_server(config, ServerConfig(shutdown_timeout=2)) as live:
        yield live


@pytest.fixture(scope="module")
def baseline(hostile_server) -> dict[str, str]:
    """Greedy answers of the base model and of the good adapter before any attack."""
    with hostile_server.client() as http:
        out = {}
        for model in (BASE, "good"):
            r = http.post("/v1/completions", json={**NORMAL, "model": model})
            assert r.status_code == 200, r.text
            out[model] = r.json()["choices"][0]["text"]
    assert out[BASE] != out["good"]  # the adapter visibly changes the output, so "same answer" means something
    return out


def set_first(key: str, value: float):
    """A rewrite_tensors edit: element [0, 0] of ``key`` becomes ``value``."""
    def edit(sd):
        sd[key][0, 0] = value
        return sd
    return edit


def unharmed(http, corpus, baseline) -> None:
    """Nothing executed, nothing registered under a hostile name, and the same answers as before."""
    assert not corpus["marker"].exists(), "a pickle was unpickled"
    assert not any(a["name"].startswith("h-") for a in http.get("/v1/adapters").json()["data"])
    still_serves(http, baseline[BASE])
    r = http.post("/v1/completions", json={**NORMAL, "model": "good"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == baseline["good"]


def assert_refused(response, status: int, reason: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    message = error_message(response)
    assert reason in message or re.search(reason, message), f"{reason!r} not in {message!r}"


# --- hostile directories under the root: refused by path, by name, and on demand ----------------------------

DIRS = {  # directory: (status, reason) when loaded by path; on demand the same unless ON_DEMAND says otherwise
    "pickle-only": (400, r"only pickle weights \(adapter_model\.bin\).*never loaded"),
    "pickle-named-safetensors": (400, r"adapter_model\.safetensors: safetensors header claims \d+ bytes"),
    "truncated": (400, r"adapter_model\.safetensors: .*corrupt or truncated"),
    "corrupt": (400, r"adapter_model\.safetensors: .*corrupt"),
    "wrong-shape": (400, r"layers\.0\.self_attn\.q_proj\.a has shape \(8, 32\), the base model needs \(8, 64\)"),
    "rank-over-limit": (400, r"q_proj has rank 16 > --max-lora-rank 8"),
    "no-config": (400, r"adapter_config\.json: missing"),
    "invalid-config": (400, r"adapter_config\.json: not valid JSON"),
    "unknown-peft-type": (400, r"peft_type 'EVIL_TUNING' is not supported"),
    "modules-to-save": (400, r"modules_to_save=\['lm_head'\]"),
    "huge-tensors": (400, r"claims 4398046511104 bytes at 0\.\.4398046511104 but the file holds 16 data bytes"),
    "huge-header": (400, r"safetensors header claims 1099511627776 bytes"),
    "symlinked-dir": (403, r"symlinked-dir: not a directory under an --adapter-root"),
    "symlinked-weights": (403, r"adapter_model\.safetensors: resolves outside the adapter root"),
    "symlinked-config": (403, r"adapter_config\.json: resolves outside the adapter root"),
    "nan-weights": (400, r"adapter_model\.safetensors: tensor '[\w.]+layers\.0\.self_attn\.q_proj\.lora_B\.weight' "
                         r"holds NaN or Inf"),
    "inf-weights": (400, r"adapter_model\.safetensors: tensor '[\w.]+layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
                         r"holds NaN or Inf"),
}
ON_DEMAND = {"no-config": (404, r"The model `no-config` does not exist")}  # without a config it is no adapter


@pytest.mark.parametrize("case", DIRS)
def test_hostile_directory_refused_by_every_route(case, hostile_server, corpus, baseline):
    status, reason = DIRS[case]
    path = corpus["root"] / case
    with hostile_server.client() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": f"h-{case}", "lora_path": str(path)})
        assert_refused(r, status, reason)
        assert r.json()["error"]["param"] in ("lora_path", None)
        assert_refused(http.post("/v1/adapters", json={"name": f"h-{case}", "source": case}), status, reason)

        status, reason = ON_DEMAND.get(case, (status, reason))
        assert_refused(http.post("/v1/completions", json={**NORMAL, "model": case}), status, reason)
        tgi = http.post("/generate", json={"inputs": "hello", "parameters": {"adapter_id": case,
                                                                              "max_new_tokens": 2}})
        assert_refused(tgi, 422 if status == 400 else status, reason)  # TGI answers validation errors with 422
        assert_stream_refused(http, case, status, reason)
        unharmed(http, corpus, baseline)


def assert_stream_refused(http, model: str, status: int, reason: str) -> None:
    """A streamed request for an adapter that cannot load is refused before the stream opens: the 4xx and the
    reason, never 200 followed by an in-band error (the route waits for the load before its status line)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.read()
    assert_refused(r, status, reason)


def test_pickle_payload_is_live_and_never_run(corpus, hostile_server):
    """The corpus' pickles would create the marker if anything unpickled them; after every route tried them,
    it does not exist (the control run in the fixture proved the payload works)."""
    with hostile_server.client() as http:
        for case in ("pickle-only", "pickle-named-safetensors"):
            http.post("/v1/load_lora_adapter", json={"lora_name": f"h-{case}", "lora_path": str(corpus["root"] / case)})
            http.post("/v1/completions", json={**NORMAL, "model": case})
    assert not corpus["marker"].exists()


# --- paths that lead outside the roots, however they are spelled -------------------------------------------

# id: (lora_path / source given the corpus, reason). Encoded dots, backslashes, URLs and ~ are no path syntax:
# they name a (missing) directory literally under the root, hence 404 (as vLLM); only '..' and absolute paths
# lead out, and those are 403 whether or not the target exists.
PATHS = {
    "dotdot-relative": (lambda c: "../outside/good", "not a directory under an --adapter-root"),
    "dotdot-absolute": (lambda c: f"{c['root']}/../outside/good", "not a directory under an --adapter-root"),
    "dotdot-via-good": (lambda c: "good/../../outside/good", "not a directory under an --adapter-root"),
    "absolute-outside": (lambda c: str(c["outside"] / "good"), "not a directory under an --adapter-root"),
    "absolute-etc": (lambda c: "/etc", "not a directory under an --adapter-root"),
    "root-parent": (lambda c: str(c["base"]), "not a directory under an --adapter-root"),
    "url-encoded": (lambda c: "%2e%2e%2foutside%2fgood", "no adapter directory there"),
    "url-encoded-absolute": (lambda c: f"{c['root']}/%2e%2e/outside/good", "no adapter directory there"),
    "double-encoded": (lambda c: "%252e%252e%252foutside%252fgood", "no adapter directory there"),
    "mixed-encoded": (lambda c: "..%2Foutside/good", "no adapter directory there"),
    "backslashes": (lambda c: "..\\outside\\good", "no adapter directory there"),
    "file-url": (lambda c: f"file://{c['outside']}/good", "no adapter directory there"),
    "http-url": (lambda c: "http://169.254.169.254/latest/meta-data", "no adapter directory there"),
    "home": (lambda c: "~/good", "no adapter directory there"),
    "nul-byte": (lambda c: "good\x00/../../outside/good", r"not a usable adapter path \(ValueError: embedded null"),
    "long-component": (lambda c: "a" * 300, r"not a usable adapter path \(OSError: \[Errno 36\] File name too long"),
    "hub-org-not-allowed": (lambda c: "evil-org/adapter", "evil-org/adapter: organization not in --hub-adapter-org"),
    "hub-prefixed-not-allowed": (lambda c: "hub:evil-org/adapter@main", "organization not in --hub-adapter-org"),
    "hub-lookalike-traversal": (lambda c: "trusted-org/../../outside/good", "not a directory under an --adapter-root"),
}


@pytest.mark.parametrize("case", PATHS)
def test_paths_outside_the_roots_are_refused(case, hostile_server, corpus, baseline):
    source, reason = PATHS[case][0](corpus), PATHS[case][1]
    status = 400 if case in ("nul-byte", "long-component") else 404 if "no adapter directory" in reason else 403
    with hostile_server.client() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": "h-path", "lora_path": source})
        assert_refused(r, status, reason)
        assert_refused(http.post("/v1/adapters", json={"name": "h-path", "source": source}), status, reason)
        replace = http.post("/v1/adapters", json={"name": "good", "source": source, "replace": True})
        assert_refused(replace, status, reason)  # a refused replacement leaves the old adapter serving
        unharmed(http, corpus, baseline)


def test_symlinked_file_added_after_a_good_load_is_refused_on_reload(hostile_server, corpus, baseline, tmp_path):
    """An adapter that was fine when loaded and is later swapped for a symlink out of the root is refused when
    it is loaded again (in place), and the previous version keeps serving."""
    root = corpus["root"]
    d = copy_adapter(root / "good", root / "turns-bad")
    try:
        with hostile_server.client() as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "h-turns-bad", "lora_path": str(d)})
            assert r.status_code == 200, r.text
            (d / WEIGHTS).unlink()
            os.symlink(corpus["outside"] / "good" / WEIGHTS, d / WEIGHTS)
            again = http.post("/v1/load_lora_adapter", json={"lora_name": "h-turns-bad", "lora_path": str(d),
                                                             "load_inplace": True})
            assert_refused(again, 403, "resolves outside the adapter root")
            kept = http.post("/v1/completions", json={**NORMAL, "model": "h-turns-bad"})
            assert kept.status_code == 200 and kept.json()["choices"][0]["text"] == baseline["good"]
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "h-turns-bad"}).status_code == 200
            unharmed(http, corpus, baseline)
    finally:
        shutil.rmtree(d)


# --- names: odd characters, traversal, encodings ------------------------------------------------------------

NAMES = ["../good", "..", "a..b", "good/../good", "/etc/passwd", "%2e%2e%2fgood", "..%2fgood", "%2e%2e",
         "has space", "new\nline", "tab\tname", "nul\x00byte", "ünïcode", "emoji🙂", "-leading-dash", ".hidden",
         "_underscore", "a" * 129, "semi;colon", "back\\slash", "<script>alert(1)</script>", "$(touch pwned)",
         "`id`", "quote'name", 'dq"name', "C:\\windows", "good%00", "\u202egood", ""]


@pytest.mark.parametrize("name", NAMES, ids=[ascii(n)[1:-1][:24] or "empty" for n in NAMES])
def test_odd_names_refused_everywhere(name, hostile_server, corpus, baseline):
    good = str(corpus["root"] / "good")
    with hostile_server.client() as http:
        r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": good})
        assert_refused(r, 400, "invalid adapter name" if name else "must be provided")
        created = http.post("/v1/adapters", json={"name": name, "source": good})
        assert_refused(created, 400, "invalid adapter name" if name else "name")
        if name:
            assert_refused(http.post("/v1/completions", json={**NORMAL, "model": name}), 404, "does not exist")
            tgi = http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": name}})
            assert tgi.status_code == 404, tgi.text
        unload = http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert unload.status_code in (400, 404), unload.text
        deleted = http.delete(f"/v1/adapters/{quote(name, safe='')}")  # not followed if redirected
        assert 300 <= deleted.status_code < 500, deleted.text
        unharmed(http, corpus, baseline)
        labels = {s.labels.get("adapter") for s in samples(http) if "adapter" in s.labels}
        assert name not in labels or name == "", "a refused name became a metrics label"


def test_encoded_traversal_in_url_paths_cannot_reach_other_adapters(hostile_server, corpus, baseline):
    """DELETE /v1/adapters/<encoded ../good> must not delete 'good' (nor anything else)."""
    with hostile_server.client() as http:
        assert http.post("/v1/adapters", json={"name": "h-victim", "source": "good"}).status_code == 201
        for raw in ("%2e%2e%2fh-victim", "..%2fh-victim", "%2e%2e%5ch-victim", "x%2f..%2f..%2fh-victim",
                    "%252e%252e%252fh-victim", "h-victim%00", "h-victim%2f"):
            r = http.delete(f"/v1/adapters/{raw}")  # a trailing '/' gets Starlette's 307, not followed
            assert 300 <= r.status_code < 500, (raw, r.status_code, r.text)
            assert "h-victim" in {a["name"] for a in http.get("/v1/adapters").json()["data"]}, raw
        assert http.delete("/v1/adapters/h-victim").status_code == 200
        unharmed(http, corpus, baseline)


# --- a server with the Hub off and no roots: nothing can be loaded from anywhere --------------------------

@pytest.fixture(scope="module")
def closed_server(tiny_model_dir):
    with live_server(engine_config(tiny_model_dir), ServerConfig(shutdown_timeout=2)) as live:
        yield live


@pytest.mark.parametrize("source, reason", [
    ("trusted-org/adapter", "Hub adapters are disabled (start with --allow-hub-adapters)"),
    ("hub:any-org/any-adapter@v1", "Hub adapters are disabled"),
    ("/etc", "loading adapters by path needs an --adapter-root; none is configured"),
    ("relative/dir/deeper", "loading adapters by path needs an --adapter-root; none is configured"),
])
def test_closed_server_loads_nothing(closed_server, source, reason):
    with closed_server.client() as http:
        assert_refused(http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": source}), 403, reason)
        assert_refused(http.post("/v1/adapters", json={"name": "x", "source": source}), 403, reason)
        assert_refused(http.post("/v1/completions", json={**NORMAL, "model": source}), 404, "does not exist")
        assert http.get("/v1/adapters").json()["data"] == []
        still_serves(http)


def test_hub_id_outside_the_allowlist_is_not_fetched_on_demand(hostile_server, corpus, baseline, tmp_path):
    """On demand, a Hub id whose org is not allowed is just an unknown model (nothing downloaded)."""
    cache = Path(hostile_server.engine.config.adapters_cache)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    with hostile_server.client() as http:
        for model in ("evil-org/adapter", "hub:evil-org/adapter", "evil-org/adapter@main", "Trusted-Org/adapter"):
            assert_refused(http.post("/v1/completions", json={**NORMAL, "model": model}), 404, "does not exist")
        unharmed(http, corpus, baseline)
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before


def test_server_survives_the_whole_corpus_at_once(hostile_server, corpus, baseline):
    """Every hostile directory requested concurrently on demand, with normal requests mixed in."""
    import asyncio

    async def run():
        async with httpx.AsyncClient(base_url=hostile_server.url, timeout=60) as http:
            hostile = [http.post("/v1/completions", json={**NORMAL, "model": case}) for case in DIRS] * 2
            normal = [http.post("/v1/completions", json=NORMAL) for _ in range(8)]
            return await asyncio.gather(*hostile, *normal)

    responses = asyncio.run(run())
    hostile, normal = responses[:2 * len(DIRS)], responses[2 * len(DIRS):]
    assert all(400 <= r.status_code < 500 for r in hostile), [(r.status_code, r.text) for r in hostile]
    assert all(r.status_code == 200 and r.json()["choices"][0]["text"] == baseline[BASE] for r in normal)
    with hostile_server.client() as http:
        unharmed(http, corpus, baseline)


# --- a directory swapped for a symlink after a load, read again after an eviction ---------------------------

def test_symlink_swapped_in_before_a_reread_is_refused(hostile_server, corpus, baseline):
    """'swap-me' loads, is evicted from host memory by as many other adapters as the tier holds, and is then
    replaced by a symlink to a valid adapter outside the root: its re-read is refused (403), and every adapter
    whose directory is intact, evicted or not, still answers as before."""
    root, store = corpus["root"], hostile_server.engine.engine.store
    with hostile_server.client() as http:
        assert http.post("/v1/completions", json={**NORMAL, "model": "swap-me"}).status_code == 200
        for name in FILLERS:
            assert http.post("/v1/completions", json={**NORMAL, "model": name}).status_code == 200
        assert store.entries["swap-me"].weights is None, "not evicted: the test proves nothing"
        (root / "swap-me").rename(corpus["base"] / "swapped-away")
        os.symlink(corpus["outside"] / "good", root / "swap-me")
        try:
            reread = http.post("/v1/completions", json={**NORMAL, "model": "swap-me"})
            assert_refused(reread, 403, r"swap-me: resolves outside the adapter roots")
            again = http.post("/v1/completions", json={**NORMAL, "model": "swap-me"})
            assert_refused(again, 403, r"swap-me: not a directory under an --adapter-root")
            why = http.get("/v1/adapters/swap-me")
            assert_refused(why, 404, r"on-demand load from .*swap-me failed .*\(answered 403\)")
            for name in (*FILLERS, "good"):
                r = http.post("/v1/completions", json={**NORMAL, "model": name})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == baseline["good"], name
            unharmed(http, corpus, baseline)
        finally:
            (root / "swap-me").unlink()
            (corpus["base"] / "swapped-away").rename(root / "swap-me")


# --- half precision: values that overflow the serving dtype -------------------------------------------------

@pytest.fixture(scope="module")
def fp16_server(tiny_model_dir, corpus):
    config = engine_config(tiny_model_dir, corpus["root"], dtype="float16", max_lora_rank=8)
    with live_server(config, ServerConfig(shutdown_timeout=2)) as live:
        yield live


def test_fp16_overflow_refused_only_where_the_slots_are_fp16(fp16_server, hostile_server, corpus):
    reason = (r"q_proj\.lora_B\.weight' times its scaling 2 reaches 80000, beyond float16's largest finite value "
              r"65504.*--dtype float32")
    with fp16_server.client() as http:
        assert_refused(http.post("/v1/completions", json={**NORMAL, "model": "fp16-overflow"}), 400, reason)
        load = {"lora_name": "h-fp16", "lora_path": str(corpus["root"] / "fp16-overflow")}
        assert_refused(http.post("/v1/load_lora_adapter", json=load), 400, reason)
        assert http.post("/v1/completions", json={**NORMAL, "model": "good"}).status_code == 200
        still_serves(http)
    with hostile_server.client() as http:  # float32 slots hold 80000 fine
        assert http.post("/v1/completions", json={**NORMAL, "model": "fp16-overflow"}).status_code == 200


# --- the Hub: sizes from the Hub's metadata, before anything is downloaded --------------------------------

def test_oversize_hub_adapter_is_refused_before_download(hostile_server, corpus, baseline, monkeypatch):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoSibling
    from types import SimpleNamespace

    listed = [RepoSibling(rfilename=CONFIG, size=400), RepoSibling(rfilename=WEIGHTS, size=4 << 30)]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, **kw: SimpleNamespace(sha="0" * 40, siblings=listed))
    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: downloads.append(a) or "/nowhere")
    reason = (r"hub:trusted-org/huge: adapter_model\.safetensors is 4294967296 bytes on the Hub, over "
              r"--max-adapter-bytes \(1073741824 bytes\); nothing was downloaded")
    with hostile_server.client() as http:
        assert_refused(http.post("/v1/completions", json={**NORMAL, "model": "trusted-org/huge"}), 400, reason)
        load = {"lora_name": "h-huge", "lora_path": "trusted-org/huge"}
        assert_refused(http.post("/v1/load_lora_adapter", json=load), 400, reason)
        unharmed(http, corpus, baseline)
    assert downloads == []


# --- admin routes without a key, through a proxy ---------------------------------------------------------

@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_proxied_admin_requests_are_refused_without_an_admin_key(header, hostile_server, corpus, baseline):
    value = "for=127.0.0.1" if header == "Forwarded" else "127.0.0.1"  # even claiming to be loopback
    with hostile_server.client(headers={header: value}) as http:
        load = {"lora_name": "h-proxied", "lora_path": str(corpus["root"] / "good")}
        assert_refused(http.post("/v1/load_lora_adapter", json=load), 403, r"came through a proxy.*--admin-key")
        assert_refused(http.delete("/v1/adapters/good"), 403, "--admin-key")
    with hostile_server.client() as http:
        unharmed(http, corpus, baseline)
