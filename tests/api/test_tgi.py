"""TGI routes (/generate, /generate_stream) over the real server, with plain HTTP."""
from __future__ import annotations

import json

import pytest


def sse_events(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]


def greedy_completion(server, model: str, prompt: str, max_tokens: int) -> str:
    out = server.openai().completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return out.choices[0].text


def test_generate_with_details_matches_openai_greedy(server):
    with server.client() as http:
        r = http.post("/generate", json={"inputs": "hello world", "parameters": {"max_new_tokens": 5, "details": True}})
    assert r.status_code == 200
    body = r.json()
    assert body["generated_text"] == greedy_completion(server, "tiny-llama", "hello world", 5)
    details = body["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 5
    assert [set(t) for t in details["tokens"]] == [{"id", "text", "logprob", "special"}] * 5
    assert all(t["logprob"] <= 0 for t in details["tokens"])


def test_sampling_without_a_seed_reports_the_seed_it_drew(server):
    """TGI's details.seed: the seed a sampled generation used (drawn when none was given; it reproduces the
    text), null for greedy."""
    params = {"max_new_tokens": 8, "details": True, "do_sample": True, "temperature": 1.5}
    with server.client() as http:
        drawn = http.post("/generate", json={"inputs": "hello world", "parameters": params}).json()
        again = http.post("/generate", json={"inputs": "hello world",
                                             "parameters": {**params, "seed": drawn["details"]["seed"]}}).json()
        greedy = http.post("/generate", json={"inputs": "hello world",
                                              "parameters": {"max_new_tokens": 2, "details": True}}).json()
        streamed = sse_events(http.post("/generate_stream", json={"inputs": "hi", "parameters": params}))
    assert isinstance(drawn["details"]["seed"], int) and again["generated_text"] == drawn["generated_text"]
    assert greedy["details"]["seed"] is None and isinstance(streamed[-1]["details"]["seed"], int)


def test_generate_adapter_id_and_full_text(server):
    with server.client() as http:
        r = http.post("/generate", json={"inputs": "hello world",
                                         "parameters": {"max_new_tokens": 6, "adapter_id": "beta",
                                                        "return_full_text": True}})
    assert r.status_code == 200 and "details" not in r.json()
    assert r.json()["generated_text"] == "hello world" + greedy_completion(server, "beta", "hello world", 6)


def test_generate_stream_events(server):
    params = {"max_new_tokens": 6, "details": True, "adapter_id": "preloaded"}
    with server.client() as http, http.stream("POST", "/generate_stream",
                                              json={"inputs": "hello world", "parameters": params}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert [e["index"] for e in events] == list(range(1, 7))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["generated_text"] == greedy_completion(server, "preloaded", "hello world", 6)
    assert last["details"]["finish_reason"] == "length" and last["details"]["generated_tokens"] == 6


def test_tgi_errors_use_tgi_shape(server):
    with server.client() as http:
        unknown = http.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}})
        stream_unknown = http.post("/generate_stream", json={"inputs": "hi", "parameters": {"adapter_id": "nope"}})
        bad_temp = http.post("/generate", json={"inputs": "hi", "parameters": {"temperature": 0}})
        missing = http.post("/generate", json={"parameters": {}})
        too_long = http.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 5000}})
    assert unknown.status_code == 404 and stream_unknown.status_code == 404
    for r in (bad_temp, missing, too_long):
        assert r.status_code == 422, r.text
        assert set(r.json()) == {"error", "error_type"} and r.json()["error_type"] == "validation"


def test_top_n_tokens_in_details_and_stream(server):
    """TGI's top_n_tokens: details.top_tokens holds, per generated token, the n most likely tokens (greedy: the
    first is the generated one); streamed events carry the same per token."""
    params = {"max_new_tokens": 4, "details": True, "top_n_tokens": 2}
    with server.client() as http:
        body = http.post("/generate", json={"inputs": "hello world", "parameters": params}).json()
        events = [json.loads(line[5:]) for line in http.post("/generate_stream", json={
            "inputs": "hello world", "parameters": params}).text.splitlines() if line.startswith("data:")]
    details = body["details"]
    assert len(details["top_tokens"]) == 4 and all(len(top) == 2 for top in details["top_tokens"])
    for token, top in zip(details["tokens"], details["top_tokens"]):
        assert top[0]["id"] == token["id"] and top[0]["logprob"] == pytest.approx(token["logprob"], abs=1e-6)
        assert top[0]["logprob"] >= top[1]["logprob"] and set(top[0]) == {"id", "text", "logprob", "special"}
    assert [e["top_tokens"] for e in events] == details["top_tokens"]


def test_decoder_input_details_fill_prefill_and_refused_params_name_themselves(server):
    """details.prefill (TGI's decoder_input_details): every prompt token, the first without a logprob; typical_p
    and watermark are not implemented, so they are refused (422) rather than ignored."""
    tok = server.engine.tokenizer
    with server.client() as http:
        r = http.post("/generate", json={"inputs": "hello world", "parameters": {
            "max_new_tokens": 2, "details": True, "decoder_input_details": True}})
        refused = [http.post("/generate", json={"inputs": "hi", "parameters": p})
                   for p in ({"typical_p": 0.5}, {"watermark": True})]
    prefill = r.json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == tok.encode("hello world")
    assert prefill[0]["logprob"] is None and all(t["logprob"] <= 0 for t in prefill[1:])
    assert [x.status_code for x in refused] == [422, 422]
    assert "typical_p" in refused[0].json()["error"] and "watermark" in refused[1].json()["error"]
