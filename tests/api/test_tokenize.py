"""vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info), GET /v1/models/{id}, x-request-id, and
the small conventions of vLLM's own API tests: stream_options needs stream, include_usage may be null,
continuous usage, refused unimplemented fields, 404 for a missing path under an adapter root, sampling
defaults from generation_config.json."""
from __future__ import annotations

import json
import shutil

import openai
import pytest

from server.api.settings import ServerConfig
from .conftest import engine_config, live_server

BASE = "tiny-llama"


def test_tokenize_and_detokenize_round_trip(server):
    tok = server.engine.tokenizer
    with server.client() as http:
        plain = http.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
        bare = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False}).json()
        chat = http.post("/tokenize", json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]}).json()
        back = http.post("/detokenize", json={"tokens": bare["tokens"]}).json()
        outside = http.post("/detokenize", json={"tokens": [1, len(tok) + 5]})  # decode() would drop it silently
    assert plain["tokens"] == tok.encode("hello world") and plain["count"] == len(plain["tokens"])
    assert plain["token_strs"] == tok.convert_ids_to_tokens(plain["tokens"]) and plain["max_model_len"] == 512
    assert bare["tokens"] == tok.encode("hello world", add_special_tokens=False)
    assert back == {"prompt": "hello world"}
    assert outside.status_code == 400 and outside.json()["error"]["param"] == "tokens"
    want = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    assert chat["tokens"] == list(getattr(want, "input_ids", want))


def test_tokenizer_info_is_what_lm_eval_reads(server):
    from lm_eval.utils import check_remote_tokenizer_support

    with server.client() as http:
        info = http.get("/tokenizer_info").json()
        bad = http.post("/tokenize", json={"prompt": "x", "messages": [{"role": "user", "content": "y"}]})
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and "chat_template" in info
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    assert check_remote_tokenizer_support(server.url + "/v1/completions")


def test_retrieve_model_and_404(server):
    client = server.openai()
    assert client.models.retrieve(BASE).id == BASE
    assert client.models.retrieve("preloaded").parent == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_every_response_has_an_x_request_id_echoing_the_clients(server):
    with server.client() as http:
        given = http.get("/v1/models", headers={"x-request-id": "trace-123"})
        fresh = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        error = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": -1})
    assert given.headers["x-request-id"] == "trace-123"
    assert len(fresh.headers["x-request-id"]) == 32 and error.headers["x-request-id"]


def test_stream_options_conventions(server):
    with server.client() as http:
        no_stream = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                       "stream_options": {"include_usage": True}})
        null = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True,
                                                   "stream_options": {"include_usage": None}})
        continuous = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True,
                                                         "stream_options": {"include_usage": True,
                                                                            "continuous_usage_stats": True}})
    assert no_stream.status_code == 400 and no_stream.json()["error"]["param"] == "stream_options"
    assert null.status_code == 200 and "usage" not in null.text
    chunks = [json.loads(line[6:]) for line in continuous.text.splitlines() if line.startswith("data: {")]
    assert all(c["usage"] is not None for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("field, value", [("best_of", 3), ("use_beam_search", True), ("suffix", "tail"),
                                          ("logit_bias", {"x5": 10}), ("logit_bias", {"5": 101}),
                                          ("logit_bias", {"99999": 1}), ("min_p", 1.5), ("prompt_logprobs", -1),
                                          ("allowed_token_ids", [3, 99999]), ("allowed_token_ids", [])])
def test_unimplemented_fields_are_400_naming_them(server, field, value):
    with server.client() as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_logit_bias_steers_completions_and_chat(server):
    """OpenAI's logit_bias: +100 on one token makes every greedy token that one, on both routes; -100 on the
    token greedy chose first takes it out. vLLM's allowed_token_ids keeps a sampled completion in its set."""
    with server.client() as http:
        plain = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0,
                                                   "return_token_ids": True}).json()["choices"][0]["token_ids"]
        forced = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0,
                                                    "return_token_ids": True, "logit_bias": {"42": 100}})
        banned = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "temperature": 0,
                                                    "return_token_ids": True,
                                                    "logit_bias": {str(plain[0]): -100}})
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                                                       "return_token_ids": True, "logit_bias": {"42": 100}})
    assert forced.json()["choices"][0]["token_ids"] == [42] * 3
    with server.client() as http:
        only = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 6, "temperature": 1.0, "seed": 1,
                                                  "return_token_ids": True, "allowed_token_ids": [40, 41, 43]})
    assert only.status_code == 200 and set(only.json()["choices"][0]["token_ids"]) <= {40, 41, 43}, only.text
    assert banned.json()["choices"][0]["token_ids"] != plain[:1]
    assert chat.status_code == 200 and chat.json()["choices"][0]["token_ids"] == [42] * 3, chat.text


def test_missing_path_under_a_root_is_404_outside_403(server, adapter_root):
    with server.client() as http:
        missing = http.post("/v1/load_lora_adapter", json={"lora_name": "nope",
                                                            "lora_path": str(adapter_root / "nope")})
        outside = http.post("/v1/load_lora_adapter", json={"lora_name": "nope", "lora_path": "/etc"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora_path"
    assert outside.status_code == 403


def test_sampling_defaults_come_from_generation_config(tiny_model_dir, tmp_path):
    """generation_config.json says top_k 1: a request that omits top_k is greedy at temperature 1; one that
    sets top_k -1 samples."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 1, "bos_token_id": 1,
                                                              "eos_token_id": 2}))
    with live_server(engine_config(model), ServerConfig(shutdown_timeout=2)) as live:
        assert live.engine.sampling_defaults == {"top_k": 1}
        client = live.openai()
        greedy = client.completions.create(model=BASE, prompt="hello", max_tokens=8, temperature=0).choices[0].text
        texts = {client.completions.create(model=BASE, prompt="hello", max_tokens=8, temperature=1.0,
                                           seed=s).choices[0].text for s in range(3)}
        free = {client.completions.create(model=BASE, prompt="hello", max_tokens=8, temperature=1.0, seed=s,
                                          extra_body={"top_k": -1}).choices[0].text for s in range(3)}
    assert texts == {greedy}
    assert len(free) > 1


def test_include_stop_str_in_output_over_http(server):
    """vLLM's include_stop_str_in_output keeps the stop string that ended a completion; without it the text ends
    before it. (skip_special_tokens is covered in tests/engine/test_detokenizer.py.)"""
    with server.client() as http:
        plain = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8, "temperature": 0,
                                                   "ignore_eos": True}).json()["choices"][0]["text"]
        stop = plain[2:4]
        body = {"prompt": "hi", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stop": [stop]}
        cut = http.post("/v1/completions", json=body).json()["choices"][0]
        kept = http.post("/v1/completions", json={**body, "include_stop_str_in_output": True}).json()["choices"][0]
    first = plain.find(stop)
    assert cut["text"] == plain[:first] and kept["text"] == plain[:first + len(stop)]
    assert cut["finish_reason"] == kept["finish_reason"] == "stop"
