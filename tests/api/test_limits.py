"""Body cap (413), bounded queue (429 + Retry-After), and client disconnects aborting their requests."""
from __future__ import annotations

import json

import httpx
import pytest

from .helpers import metric_value, wait_for

LONG = {"model": "tiny-llama", "prompt": "hello world", "max_tokens": 480, "ignore_eos": True, "temperature": 0}


def aborted(http) -> float:
    return metric_value(http, "vllm:request_success_total", finished_reason="abort")


def test_body_over_the_cap_is_413_in_each_shape(server):
    big = "word " * 20000  # > 64 KiB
    with server.client() as http:
        openai_style = http.post("/v1/completions", json={"prompt": big})
        tgi_style = http.post("/generate", json={"inputs": big})
    assert openai_style.status_code == 413 and openai_style.json()["error"]["code"] == 413
    assert tgi_style.status_code == 413 and set(tgi_style.json()) == {"error", "error_type"}


def test_chunked_body_over_the_cap_is_413(server):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    with server.client() as http:
        r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max-body-bytes" in r.json()["error"]["message"]


def test_full_queue_is_429_with_retry_after(tight_server):
    """One running row and one waiting slot: the third concurrent request is refused, and only then."""
    engine = tight_server.engine
    with tight_server.client() as a, tight_server.client() as b, tight_server.client() as c:
        with a.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running:
            assert running.status_code == 200
            assert wait_for(lambda: engine.stats()["num_running"] == 1)
            with b.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as waiting:
                assert waiting.status_code == 200
                assert wait_for(lambda: engine.stats()["num_waiting"] == 1)
                refused = c.post("/v1/completions", json={**LONG, "max_tokens": 1})
                tgi_refused = c.post("/generate", json={"inputs": "hi"})
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert tgi_refused.status_code == 429 and tgi_refused.json()["error_type"] == "overloaded"
    assert wait_for(lambda: engine.stats()["num_running"] + engine.stats()["num_waiting"] == 0)
    with tight_server.client() as http:
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**LONG, "stream": True}),
    ("/v1/chat/completions", {**LONG, "stream": True, "prompt": None, "messages": [{"role": "user", "content": "hi"}]}),
    ("/generate_stream", {"inputs": "hello", "parameters": {"max_new_tokens": 480}}),
])
def test_stream_disconnect_aborts_the_request(server, path, body):
    with server.client() as http:
        before = aborted(http)
        with server.client() as gone, gone.stream("POST", path, json=body) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data:"))
            assert "error" not in json.loads(first[5:])
        assert wait_for(lambda: aborted(http) == before + 1, timeout=5)
        assert wait_for(lambda: server.engine.stats()["num_running"] == 0, timeout=5)


def test_non_stream_disconnect_aborts_the_request(server):
    with server.client() as http:
        before = aborted(http)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.3))
        assert wait_for(lambda: aborted(http) == before + 1, timeout=5)
        assert wait_for(lambda: server.engine.stats()["num_running"] == 0, timeout=5)
