"""Structured outputs over HTTP, as vLLM's own API tests use them: response_format json_object / json_schema,
structured_outputs choice / json / regex / grammar on completions and chat, 400 naming the field for invalid
ones before anything runs, the openai SDK's beta parse with a pydantic model, and a concurrent batch mixing
constrained and free requests on different adapters whose outputs equal the same requests run alone."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

BASE = "tiny-llama"
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Berlin"]}, "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "weather?"}]


class Weather(BaseModel):
    city: Literal["Paris", "Berlin"]  # the test model is random: a free string would run to the limit
    sunny: bool


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": BASE, "messages": MESSAGES, "max_tokens": 64,
                                             "temperature": 0, **kwargs})


def test_response_format_json_schema_and_json_object(server):
    client = server.openai()
    out = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}})
    value = json.loads(out.choices[0].message.content)
    assert value["city"] in ("Paris", "Berlin") and isinstance(value["sunny"], bool)
    assert out.choices[0].finish_reason == "stop"
    obj = chat(client, model="alpha", max_tokens=200, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":  # a random model may fill a string to the limit
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:
        assert obj.choices[0].message.content.lstrip().startswith("{")


@pytest.mark.parametrize("structured, check", [
    ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
    ({"regex": r"\d{3}-[a-c]{2}"}, lambda t: re.fullmatch(r"\d{3}-[a-c]{2}", t)),
    ({"json": SCHEMA}, lambda t: json.loads(t)["city"] in ("Paris", "Berlin")),
    ({"grammar": 'root ::= "x" [0-9] ("!" | "?")'}, lambda t: re.fullmatch(r"x[0-9][!?]", t)),
])
def test_structured_outputs_on_completions_and_chat(server, structured, check):
    client = server.openai()
    text = client.completions.create(model="alpha", prompt="hello", max_tokens=64, temperature=0,
                                     extra_body={"structured_outputs": structured}).choices[0].text
    assert check(text), text
    message = chat(client, extra_body={"structured_outputs": structured}).choices[0].message.content
    assert check(message), message


@pytest.mark.parametrize("body, param", [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json": {"type": "no-such-type"}}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "structural_tag"}}, "type"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
])
def test_invalid_structured_requests_are_400_naming_the_field(server, body, param):
    with server.client() as http:
        before = server.engine.stats()
        r = http.post("/v1/chat/completions", json={"model": BASE, "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert before["num_running"] == 0


def test_sdk_parse_returns_a_parsed_object(server):
    out = server.openai().beta.chat.completions.parse(model=BASE, messages=MESSAGES, response_format=Weather,
                                                      max_tokens=64, temperature=0)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Weather) and parsed.city


def test_mixed_batch_outputs_equal_each_request_alone(server):
    """Constrained and free requests on base and adapters, sent at once: each output equals its own run alone."""
    client = server.openai()
    jobs = [dict(model="alpha", extra_body={"structured_outputs": {"regex": r"[a-z ]{5,20}"}}),
            dict(model=BASE, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}),
            dict(model="beta"), dict(model="alpha"),
            dict(model="beta", extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})]
    alone = [chat(client, **job).choices[0].message.content for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: chat(client, **job).choices[0].message.content, jobs))
    assert together == alone


def test_tgi_grammar(server):
    with server.client() as http:
        r = http.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 20, "grammar": {
            "type": "regex", "value": "[0-9]{4}"}}})
        bad = http.post("/generate", json={"inputs": "hello", "parameters": {"grammar": {"type": "regex",
                                                                                       "value": "("}}})
    assert re.fullmatch(r"[0-9]{4}", r.json()["generated_text"]), r.text
    assert bad.status_code == 422


def test_allowed_token_ids_the_grammar_never_accepts_say_so(server):
    """A grammar and allowed_token_ids with nothing in common leave no token: the 400 says that, not that the
    model's logits were not finite."""
    tok = server.engine.tokenizer
    letters = sorted({i for text in ("a", "b", "x") for i in tok.encode(text, add_special_tokens=False)})
    with server.client() as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "allowed_token_ids": letters,
                                               "structured_outputs": {"regex": "[0-9]{3}"}})
    assert r.status_code == 400 and "none of allowed_token_ids" in r.json()["error"]["message"], r.text
