"""Tool calling through the openai SDK on a scripted model (support.build_scripted_llama: after <|assistant|> it
writes a Hermes <tool_call> block, after a tool result it answers): auto parses the model's own call, required
and a named function are enforced by grammar, each streamed and not; the tool result flows back through the
template; the template receives the tools."""
from __future__ import annotations

import json

import openai
import pytest

import support
from server.api.settings import ServerConfig
from .conftest import engine_config, live_server

MODEL = "scripted"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "today's weather",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"enum": ["Paris", "Berlin"]}},
                                                            "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    out = tmp_path_factory.mktemp("scripted-llama")
    support.build_scripted_llama(out)
    config = engine_config(out, served_model_name=MODEL, max_model_len=2048)
    with live_server(config, ServerConfig(shutdown_timeout=2)) as live:
        yield live


def create(client, stream: bool, **kwargs):
    """A chat completion, or the same rebuilt from its stream's deltas (content, tool_calls, finish_reason)."""
    kwargs = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "max_tokens": 150, "temperature": 0, **kwargs}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, [(c["id"], c["name"], json.loads(c["arguments"])) for c in calls.values()], finish


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_models_tool_call_and_the_result_flows_back(scripted, stream):
    client = scripted.openai()
    content, calls, finish = create(client, stream, tool_choice="auto")
    assert content is None and finish == "tool_calls"
    [(call_id, name, arguments)] = calls
    assert name == "get_weather" and arguments == {"city": "Paris"} and call_id.startswith("chatcmpl-tool-")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"}]
    answer, calls, finish = create(client, stream, messages=history, tool_choice="auto")
    assert answer == support.TOOL_ANSWER and calls == [] and finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_required_is_enforced_by_grammar(scripted, stream):
    content, calls, finish = create(scripted.openai(), stream, tool_choice="required", parallel_tool_calls=False)
    assert finish == "tool_calls" and content is None
    [(_, name, arguments)] = calls
    assert (name, set(arguments)) in (("get_weather", {"city"}), ("get_time", {"zone"}))


@pytest.mark.parametrize("stream", [False, True])
def test_named_function_is_enforced_by_its_schema(scripted, stream):
    choice = {"type": "function", "function": {"name": "get_time"}}
    content, calls, finish = create(scripted.openai(), stream, tool_choice=choice)
    [(_, name, arguments)] = calls
    assert name == "get_time" and arguments["zone"] in ("UTC", "CET") and finish == "stop"


def test_none_returns_text_and_the_template_sees_the_tools(scripted):
    content, calls, _ = create(scripted.openai(), False, tool_choice="none")
    assert calls == [] and content.startswith("<tool_call>")
    with scripted.client() as http:
        ids = http.post("/tokenize", json={"messages": ASK, "tools": [WEATHER]}).json()["tokens"]
    assert '"get_weather"' in scripted.engine.tokenizer.decode(ids)


def test_tool_choice_errors_name_the_field(scripted):
    client = scripted.openai()
    for kwargs in (dict(tools=None, tool_choice="required"),
                   dict(tool_choice={"type": "function", "function": {"name": "nope"}})):
        with pytest.raises(openai.BadRequestError) as err:
            create(client, False, **kwargs)
        assert err.value.response.json()["error"]["param"] == "tool_choice"
