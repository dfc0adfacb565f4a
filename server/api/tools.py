"""Tool calling in chat: the request's ``tools`` / ``tool_choice`` models, the grammar that enforces a required
or named call, and the parser that reads the model's own tool-call format (Hermes-style first) for ``auto``.

tool_choice   output                                              finish_reason
none          text (the template still sees the tools)             as generated
auto          text; <tool_call>{"name", "arguments"}</tool_call>   "tool_calls" when a call was parsed
              blocks become tool_calls (HermesParser)
required      a JSON array [{"name", "parameters"}, ...] (vLLM's    "tool_calls"
              shape), enforced by a grammar; one item when
              parallel_tool_calls is false
{function}    the function's arguments, enforced by its            "stop" (OpenAI's, for a forced function)
              parameters schema
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints

from server.api.strict import Strict
from server.engine.grammar import GrammarSpec
from server.errors import InvalidRequestError

FunctionName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class FunctionDef(Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: FunctionName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(Strict):
    name: Annotated[str, StringConstraints(max_length=256)]
    arguments: Annotated[str, StringConstraints(max_length=1 << 20)] = "{}"


class ToolCall(Strict):
    id: Annotated[str, StringConstraints(max_length=256)] | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def choice_mode(tools: list[Tool] | None, choice: ToolChoice | None) -> str | None:
    """"none" | "auto" | "required" | "named", or None without tools. Checks the choice against the tools."""
    if not tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools: give the functions in 'tools'", "tool_choice")
        return None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t.function.name for t in tools}:
            raise InvalidRequestError(f"tool_choice names function {choice.function.name!r}, which is not in "
                                      "'tools'", "tool_choice")
        return "named"
    return choice or "auto"


def tool_grammar(tools: list[Tool], choice: ToolChoice, parallel: bool) -> GrammarSpec | None:
    """The grammar enforcing a required or named call (None for auto / none)."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        return GrammarSpec.json_schema(_parameters(tool), "tools")
    if choice != "required":
        return None
    items = [{"type": "object", "properties": {"name": {"const": t.function.name}, "parameters": _parameters(t)},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return GrammarSpec.json_schema(schema, "tools")


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def parse_required(text: str) -> list[ParsedCall] | None:
    """The calls of a ``required`` output (a JSON array of {"name", "parameters"}); None if it is cut short."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [ParsedCall(i["name"], json.dumps(i["parameters"], ensure_ascii=False)) for i in items]


class HermesParser:
    """Hermes / Qwen / many others: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks after
    optional text. Used for tool_choice auto; output without a parsable block stays text."""

    START, END = "<tool_call>", "</tool_call>"
    BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        """(content before the first call or None, the calls); no calls if any block does not parse."""
        start = text.find(self.START)
        if start == -1:
            return text, []
        calls = []
        for block in self.BLOCK.findall(text[start:]):
            try:
                item = json.loads(block.strip())
                calls.append(ParsedCall(item["name"], json.dumps(item.get("arguments", {}), ensure_ascii=False)))
            except (json.JSONDecodeError, KeyError, TypeError):
                return text, []
        content = text[:start].strip()
        return content or None, calls

    def safe_prefix(self, text: str) -> int:
        """How much of streamed ``text`` is surely content: everything before a call starts, less any tail that
        could still become the start tag."""
        start = text.find(self.START)
        if start != -1:
            return start
        for keep in range(min(len(self.START) - 1, len(text)), 0, -1):
            if self.START.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


def call_dicts(calls: list[ParsedCall], ids: list[str] | None = None) -> list[dict]:
    """OpenAI's message.tool_calls entries."""
    ids = ids or [new_call_id() for _ in calls]
    return [{"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in zip(ids, calls)]


def template_tool_calls(calls: list[ToolCall]) -> list[dict]:
    """An assistant message's tool_calls as chat templates read them: arguments as a dict (vLLM does the same;
    templates write them with tojson)."""
    out = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except json.JSONDecodeError:
            raise InvalidRequestError(f"tool call {call.function.name!r}: arguments are not JSON",
                                      "messages") from None
        out.append({"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                                   "arguments": arguments}})
    return out


MAX_TOOLS = 128
Tools = Annotated[list[Tool], Field(max_length=MAX_TOOLS)]
