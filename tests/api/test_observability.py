"""What /metrics, ids and TGI's stream report while requests run (found in a review against vLLM and TGI):
token counters and TTFT move as tokens come, a failed request is "error", the client's X-Request-Id names the
completion, and TGI's stream gives each token its own text."""
from __future__ import annotations

import json

from .helpers import fail_next_step, metric_value

BASE = "tiny-llama"


def test_token_counters_and_ttft_move_while_a_stream_runs(server):
    body = {"model": BASE, "prompt": "hello world", "max_tokens": 60, "ignore_eos": True, "stream": True}
    with server.client() as http, server.client() as probe:
        before = {name: metric_value(probe, name) for name in
                  ("vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:time_to_first_token_seconds_count")}
        with http.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: {")
                if seen == 10:
                    break
            during = {name: metric_value(probe, name) - value for name, value in before.items()}
    assert during["vllm:generation_tokens_total"] >= 10 and during["vllm:time_to_first_token_seconds_count"] == 1
    assert during["vllm:prompt_tokens_total"] == len(server.engine.tokenizer.encode("hello world"))


def test_a_failed_request_finishes_as_error(server, monkeypatch):
    with server.client() as http:
        errors = metric_value(http, "vllm:request_success_total", finished_reason="error")
        fail_next_step(server, monkeypatch)
        assert http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2}).status_code == 500
        assert metric_value(http, "vllm:request_success_total", finished_reason="error") == errors + 1


def test_the_clients_request_id_names_the_completion(server):
    with server.client() as http:
        r = http.post("/v1/completions", headers={"x-request-id": "client-req-42"},
                      json={"model": BASE, "prompt": "hi", "max_tokens": 2})
    assert r.headers["x-request-id"] == "client-req-42" and r.json()["id"].startswith("cmpl-client-req-42-")


def test_tgi_stream_gives_each_token_its_own_text_with_stop_sequences(server):
    tok = server.engine.tokenizer
    with server.client() as http:
        full = http.post("/generate", json={"inputs": "Paris is", "parameters": {"max_new_tokens": 12}}).json()
        text = full["generated_text"]
        stop = next(piece for piece in (text[i:i + 3] for i in range(2, len(text) - 2))
                    if piece.strip() and "\ufffd" not in piece)
        with http.stream("POST", "/generate_stream", json={"inputs": "Paris is", "parameters": {
                "max_new_tokens": 12, "stop": [stop]}}) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    ids = [e["token"]["id"] for e in events]
    texts = [e["token"]["text"] for e in events]
    assert "".join(texts) == tok.decode(ids, skip_special_tokens=True)  # each token's text, none held for the stop
    assert events[-1]["generated_text"].endswith(stop)
