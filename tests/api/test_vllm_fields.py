"""Fields whose meaning follows vLLM's server (found in a review against it): stop_reason, token ids checked
against the vocabulary, min_tokens against max_tokens and stop strings, a tiny temperature, chat template
kwargs, echo with both logprob kinds, usage options, TGI's stop sequences, a failed engine step."""
from __future__ import annotations

import json

import httpx
import pytest

from server.api.tool_stream import ToolOutput
from .helpers import fail_next_step

BASE = "tiny-llama"
PROMPT = "Paris is the capital of"


def post(server, path: str, body: dict) -> httpx.Response:
    with server.client() as http:
        return http.post(path, json={"model": BASE, **body})


def complete(server, **body) -> dict:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def events(server, path: str, body: dict) -> list[dict]:
    with server.client() as http, http.stream("POST", path, json={"model": BASE, "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def clean_pair(text: str) -> str:
    """Two characters of ``text`` (past its first) to stop on: no whitespace only, no U+FFFD."""
    return next(text[i:i + 2] for i in range(1, len(text) - 1)
                if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])


def test_stop_reason_names_the_stop_string_or_token_that_ended_the_request(server):
    full = complete(server, max_tokens=12, ignore_eos=True, return_token_ids=True)["choices"][0]
    text, ids = full["text"], full["token_ids"]
    stop = clean_pair(text)
    by_string = complete(server, max_tokens=12, stop=[stop, "never-there"])["choices"][0]
    assert (by_string["finish_reason"], by_string["stop_reason"]) == ("stop", stop)
    by_token = complete(server, max_tokens=12, stop_token_ids=[ids[3]])["choices"][0]
    assert by_token["finish_reason"] == "stop" and by_token["stop_reason"] == ids[3]
    assert complete(server, max_tokens=3, ignore_eos=True)["choices"][0]["stop_reason"] is None  # length
    streamed = events(server, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "max_tokens": 12,
                                                  "stop": [stop]})
    assert streamed[-1]["choices"][0]["stop_reason"] == stop
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                                                 "temperature": 0, "stop_token_ids": [ids[0]], "ignore_eos": True})
    reason = chat.json()["choices"][0]
    assert reason["stop_reason"] in (ids[0], None) and (reason["stop_reason"] is None) == (reason["finish_reason"]
                                                                                          == "length")


def test_token_ids_outside_the_vocabulary_are_refused_and_never_reach_a_batch(server):
    """An out-of-vocabulary stop token with min_tokens indexed past the logits in the step thread: the step failed
    and every request in it (other clients' too) ended as if finished. Now a 400 at admission."""
    vocab = len(server.engine.tokenizer)
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 5, "min_tokens": 3,
                                         "stop_token_ids": [vocab + 10]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text


def test_min_tokens_above_max_tokens_is_400(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text


def test_a_temperature_too_small_to_divide_by_is_greedy(server):
    greedy = complete(server, max_tokens=8, ignore_eos=True)["choices"][0]["text"]
    tiny = complete(server, max_tokens=8, ignore_eos=True, temperature=1e-39)["choices"][0]["text"]
    assert tiny == greedy


def test_a_complete_grammar_ends_the_request_before_min_tokens(server):
    """min_tokens bans EOS; once a choice grammar is complete only EOS is allowed: the grammar wins (the output
    is the choice), where the row used to be all -inf and a token outside the grammar was drawn."""
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 10, "min_tokens": 8, "temperature": 0,
                                         "structured_outputs": {"choice": ["yes", "no"]}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")


def test_chat_template_kwargs_override_the_request_fields_and_reserved_ones_are_400(server):
    messages = [{"role": "user", "content": "hi"}]
    plain = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2,
                                                  "chat_template_kwargs": {"add_generation_prompt": False}})
    assert plain.status_code == 200, plain.text
    default = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2})
    assert plain.json()["usage"]["prompt_tokens"] < default.json()["usage"]["prompt_tokens"]
    bad = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 2,
                                                "chat_template_kwargs": {"tokenize": False}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs", bad.text


def test_chat_stream_sends_the_prompt_token_ids_with_each_choices_first_chunk(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2, "return_token_ids": True}
    whole = post(server, "/v1/chat/completions", body).json()["prompt_token_ids"]
    chunks = events(server, "/v1/chat/completions", body)
    with_ids = [c for c in chunks if "prompt_token_ids" in c]
    assert len(with_ids) == 2 and all(c["prompt_token_ids"] == whole for c in with_ids)
    assert {c["choices"][0]["index"] for c in with_ids} == {0, 1}
    assert all(c["choices"][0]["delta"].get("role") == "assistant" for c in with_ids)


def test_echo_logprobs_show_logprobs_entries_and_prompt_logprobs_their_own_count(server):
    """The engine computes max(logprobs, prompt_logprobs) prompt entries; each field shows its own count."""
    out = complete(server, max_tokens=2, echo=True, logprobs=1, prompt_logprobs=4)["choices"][0]
    prompt_len = len(server.engine.tokenizer.encode(PROMPT))
    echoed = out["logprobs"]["top_logprobs"][:prompt_len]
    assert echoed[0] is None and all(1 <= len(top) <= 2 for top in echoed[1:])
    assert all(len(entry) in (4, 5) for entry in out["prompt_logprobs"][1:])
    wide = complete(server, max_tokens=1, echo=True, logprobs=4, prompt_logprobs=1)["choices"][0]
    assert all(len(entry) in (1, 2) for entry in wide["prompt_logprobs"][1:])


def test_continuous_usage_stats_only_with_include_usage(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "stream_options": {"continuous_usage_stats": True}}
    alone = events(server, "/v1/completions", body)
    assert all("usage" not in c or c["usage"] is None for c in alone)
    body["stream_options"]["include_usage"] = True
    both = events(server, "/v1/completions", body)
    assert all(c["usage"] for c in both) and not both[-1]["choices"]
    # with n > 1 a chunk's usage is its own choice's so far (vLLM's), the last chunk the whole request's
    body.update(n=2, max_tokens=4, temperature=1.0, seed=3, ignore_eos=True)
    chunks = events(server, "/v1/completions", body)
    seen = {0: 0, 1: 0}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        seen[choice["index"]] += 1
        assert c["usage"]["completion_tokens"] == seen[choice["index"]], c
        assert c["usage"]["prompt_tokens"] == chunks[-1]["usage"]["prompt_tokens"]
    assert chunks[-1]["usage"]["completion_tokens"] == 8 and seen == {0: 4, 1: 4}


def test_validation_errors_name_the_request_field_not_a_union_branch(server):
    r = post(server, "/v1/completions", {"prompt": {"not": "a prompt"}, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = post(server, "/v1/completions", {"prompt": "hi", "stop": [1, 2]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


def test_tgi_keeps_the_stop_sequence_as_tgi_does(server):
    with server.client() as http:
        full = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}}).json()
        text = full["generated_text"]
        stop = clean_pair(text)
        cut = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "stop": [stop],
                                                                             "details": True}}).json()
    assert cut["generated_text"] == text[:text.index(stop) + len(stop)]
    assert cut["details"]["finish_reason"] == "stop_sequence"


def test_parallel_tool_calls_false_keeps_the_first_call_in_auto_mode():
    text = ('<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    assert [c.name for c in ToolOutput("auto", "auto").calls(text, "stop")[1]] == ["a", "b"]
    assert [c.name for c in ToolOutput("auto", "auto", parallel=False).calls(text, "stop")[1]] == ["a"]
    message, finish = ToolOutput("auto", "auto", parallel=False).message(text, "stop")
    assert len(message["tool_calls"]) == 1 and finish == "tool_calls"


def test_a_failed_engine_step_ends_its_requests_with_a_500_and_the_server_keeps_serving(server, monkeypatch):
    fail_next_step(server, monkeypatch)
    r = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 500 and "internal error in an engine step" in r.json()["error"]["message"], r.text
    assert post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3}).status_code == 200
