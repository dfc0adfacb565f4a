"""Adapter mixtures over HTTP: the `adapters` field of /v1/completions, /v1/chat/completions and TGI's
`parameters.adapters`, served as PEFT's add_weighted_adapter(cat) serves them; and every refusal leaves the
adapter store as it was (nothing registered, loaded or held by a refused request)."""
from __future__ import annotations

import json
import logging

import pytest

from server.api.settings import ServerConfig
from support import adapter_root, greedy_tokens, peft_mixture_for, peft_model_for
from .conftest import engine_config, live_server
from .helpers import metric_value, wait_for

ROOT_KINDS = {"alpha": "lora", "beta": "lora2", "rs": "rslora", "pat": "lora_pattern", "dora": "dora", "ia3": "ia3",
              "fresh": "lora", "fresh2": "lora2", "freshdora": "dora"}
PROMPT = [1, 40, 41, 42, 43, 44, 45]
STEPS = 6


@pytest.fixture(scope="module")
def mix_root(adapters, tmp_path_factory):
    return adapter_root(adapters, tmp_path_factory.mktemp("mix-root"), ROOT_KINDS)


@pytest.fixture(scope="module")
def mix_server(tiny_model_dir, mix_root):
    config = engine_config(tiny_model_dir, mix_root, max_loras=4, max_cpu_loras=16, max_adapters_per_request=3)
    with live_server(config, ServerConfig(enable_log_requests=True, shutdown_timeout=2)) as live:
        yield live


def complete(http, prompt=PROMPT, route="/v1/completions", **fields):
    return http.post(route, json={"prompt": prompt, "max_tokens": STEPS, "temperature": 0,
                                  "return_token_ids": True, **fields})


def tokens(response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


@pytest.mark.parametrize("mix", [[("alpha", 0.7), ("beta", -0.4)], [("rs", 1.3), ("alpha", 0.5), ("pat", -0.8)],
                                 [("alpha", 0.5)]])
def test_a_mixture_serves_peft_add_weighted_adapter_cat_tokens(mix_server, mix_root, tiny_model_dir, mix):
    with mix_server.client() as http:
        got = tokens(complete(http, adapters=[{"name": n, "scale": s} for n, s in mix]))
    want, _ = greedy_tokens(peft_mixture_for(tiny_model_dir, [(mix_root / n, s) for n, s in mix]), PROMPT, STEPS)
    assert got == want
    assert got != greedy_tokens(peft_model_for(tiny_model_dir, None), PROMPT, STEPS)[0], "the mixture changes nothing"


def test_one_entry_at_scale_one_is_the_plain_adapter_and_scale_zero_the_base(mix_server):
    with mix_server.client() as http:
        plain = tokens(complete(http, model="alpha"))
        assert tokens(complete(http, adapters=[{"name": "alpha"}])) == plain
        assert tokens(complete(http, adapters=[{"name": "alpha", "scale": None}])) == plain
        assert tokens(complete(http, model="tiny-llama", adapters=[{"name": "alpha", "scale": 1.0}])) == plain
        assert tokens(complete(http, adapters=[{"name": "alpha", "scale": 0}])) == tokens(complete(http))


def test_chat_and_tgi_take_the_same_mixture(mix_server):
    mix = [{"name": "alpha", "scale": 0.7}, {"name": "beta", "scale": -0.4}]
    with mix_server.client() as http:
        chat = http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hello world"}], "max_tokens": STEPS, "temperature": 0,
            "return_token_ids": True, "adapters": mix})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert tokens(complete(http, body["prompt_token_ids"], adapters=mix)) == body["choices"][0]["token_ids"]
        text = "hello world"
        tgi = http.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": STEPS, "adapters": mix}})
        assert tgi.status_code == 200, tgi.text
        want = http.post("/v1/completions", json={"prompt": text, "max_tokens": STEPS, "temperature": 0,
                                                  "adapters": mix}).json()["choices"][0]["text"]
        assert tgi.json()["generated_text"] == want


def test_the_openai_sdk_sends_adapters_in_extra_body(mix_server):
    client = mix_server.openai()
    out = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=STEPS, temperature=0,
                                    extra_body={"adapters": [{"name": "alpha", "scale": 0.5}],
                                                "return_token_ids": True})
    with mix_server.client() as http:
        assert out.choices[0].token_ids == tokens(complete(http, adapters=[{"name": "alpha", "scale": 0.5}]))


def store_state(engine) -> dict:
    """What a refused request must leave as it found: names registered, requests held, the host tier."""
    store = engine.engine.store
    with store.lock:
        return {"entries": {n: (e.key, e.in_flight, e.pinned) for n, e in store.entries.items()},
                "host": list(store.host), "retired": list(store.retired), "reserved": store.budget.reserved}


REFUSALS = [  # (adapters field, status, words the message must hold)
    ([{"name": "fresh"}, {"name": "nope"}], 404, ["nope"]),
    ([{"name": "fresh", "scale": 0.5}, {"name": "fresh2"}, {"name": "alpha"}, {"name": "beta"}], 400,
     ["4 adapters", "--max-adapters-per-request"]),
    ([{"name": "fresh", "scale": 101}], 400, ["fresh", "100"]),
    ([{"name": "fresh", "scale": -1e300}], 400, ["fresh", "100"]),
    ([{"name": "fresh"}, {"name": "freshdora"}], 400, ["freshdora", "DoRA"]),
    ([{"name": "freshdora", "scale": 0.5}], 400, ["freshdora", "DoRA"]),
    ([{"name": "fresh"}, {"name": "ia3"}], 400, ["ia3", "IA3"]),
    ([{"name": "fresh"}, {"name": "fresh", "scale": 0.5}], 400, ["twice"]),
    ([], 400, ["adapters"]),
    ([{"name": "fresh", "weight": 0.5}], 400, ["weight"]),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
@pytest.mark.parametrize("mix, status, words", REFUSALS)
def test_a_refused_mixture_leaves_the_store_as_it_was(mix_server, route, mix, status, words):
    if route == "/generate":
        body, status = {"inputs": "hello", "parameters": {"adapters": mix}}, 422 if status == 400 else status
    else:
        body = {"prompt": PROMPT, "max_tokens": 2, "adapters": mix}
    r = refused(mix_server, route, json.dumps(body), status, words)
    if route != "/generate" and status == 404:
        assert r.json()["error"]["param"] == "adapters"


@pytest.mark.parametrize("scale", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_scale_is_refused(mix_server, scale):
    """JSON has no non-finite numbers, but Python's parser takes these spellings (and 1e999 overflows to inf)."""
    body = f'{{"prompt": [1, 2, 3], "max_tokens": 2, "adapters": [{{"name": "fresh", "scale": {scale}}}]}}'
    refused(mix_server, "/v1/completions", body, 400, ["fresh", "finite"])


def refused(live, route: str, body: str, status: int, words: list[str]):
    """POST ``body``: answered ``status`` with every one of ``words``, and the adapter store left as it was."""
    before = store_state(live.engine)
    with live.client() as http:
        r = http.post(route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert all(w in r.text for w in words), r.text
    assert store_state(live.engine) == before
    return r


@pytest.mark.parametrize("route, body, fields", [
    ("/v1/completions", {"prompt": "hi", "model": "alpha", "adapters": [{"name": "beta"}]}, ("model", "adapters")),
    ("/generate", {"inputs": "hi", "parameters": {"adapter_id": "alpha", "adapters": [{"name": "beta"}]}},
     ("parameters.adapter_id", "parameters.adapters")),
])
def test_an_adapter_in_model_and_adapters_together_is_refused_naming_both(mix_server, route, body, fields):
    words = [f"`{fields[0]}`", f"`{fields[1]}`", "'alpha'"]
    refused(mix_server, route, json.dumps(body), 422 if route == "/generate" else 400, words)


def test_a_mixture_counts_each_adapter_in_the_metrics(mix_server):
    with mix_server.client() as http:
        before = {n: metric_value(http, "swapserve:adapter_requests_total", adapter=n) for n in ("alpha", "beta")}
        tokens(complete(http, adapters=[{"name": "alpha", "scale": 0.3}, {"name": "beta", "scale": 0.2}]))
        for name in ("alpha", "beta"):
            assert metric_value(http, "swapserve:adapter_requests_total", adapter=name) == before[name] + 1


def test_the_request_log_shows_the_mixture(mix_server, caplog):
    with caplog.at_level(logging.INFO, logger="swapserve.requests"), mix_server.client() as http:
        r = http.post("/v1/completions", headers={"x-request-id": "ignored"}, json={
            "prompt": PROMPT, "max_tokens": 3, "adapters": [{"name": "alpha", "scale": 0.7},
                                                            {"name": "beta", "scale": -0.25}]})
        request_id = r.json()["id"]
        assert wait_for(lambda: any(request_id in m for m in caplog.messages))
        tokens(complete(http))
        assert wait_for(lambda: any("adapters=tiny-llama " in m for m in caplog.messages))
    line = next(m for m in caplog.messages if request_id in m)
    assert "adapters=alpha*0.7+beta*-0.25 " in line and "prompt_tokens=7 " in line and "generated_tokens=3 " in line


def test_a_refused_mixture_counts_its_known_adapters_and_no_client_names(mix_server):
    """Error labels: a known component by its name, an unknown one as <unknown> (client names mint no labels)."""
    name = "swapserve:adapter_errors_total"
    with mix_server.client() as http:
        tokens(complete(http, model="alpha"))  # alpha is known from here on
        before = [metric_value(http, name, adapter=a) for a in ("alpha", "<unknown>")]
        r = complete(http, adapters=[{"name": "alpha"}, {"name": "nope-label"}])
        assert r.status_code == 404
        assert [metric_value(http, name, adapter=a) for a in ("alpha", "<unknown>")] == [b + 1 for b in before]
        assert "nope-label" not in http.get("/metrics").text
