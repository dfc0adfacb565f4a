"""Structured-output request fields: OpenAI's ``response_format`` and vLLM's ``structured_outputs``, and the
GrammarSpec each asks for (compiled by the engine's GrammarCompiler).

response_format: {"type": "text"} | {"type": "json_object"} |
                 {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
structured_outputs: exactly one of {"json": schema, "regex": str, "choice": [str], "grammar": EBNF,
                    "json_object": true}
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, model_validator

from server.api.strict import Strict, refuse
from server.engine.grammar import GrammarSpec
from server.errors import InvalidRequestError

MAX_SPEC_CHARS = 64 * 1024
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SPEC_CHARS)]


class JsonSchema(Strict):
    name: Annotated[str, StringConstraints(max_length=256)] = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_present(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise refuse(self, "json_schema", "response_format type json_schema needs json_schema.schema")
        return self

    def spec(self) -> GrammarSpec | None:
        if self.type == "json_object":
            return GrammarSpec("json_object", "", "response_format")
        if self.type == "json_schema":
            return GrammarSpec.json_schema(self.json_schema.schema_, "response_format.json_schema.schema")
        return None


class StructuredOutputs(Strict):
    """vLLM's ``structured_outputs``: exactly one constraint."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=4096)]],
                      Field(min_length=1, max_length=1024)] | None = None
    grammar: Text | None = None
    json_object: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, "json_" if name == "json" else name) not in (None, False)]
        if len(given) != 1:
            raise refuse(self, "structured_outputs", "give exactly one of json, regex, choice, grammar, "
                         f"json_object (got {', '.join(given) or 'none'})")
        return self

    def spec(self) -> GrammarSpec:
        field = "structured_outputs."
        if self.json_ is not None:
            if isinstance(self.json_, str):
                try:
                    return GrammarSpec.json_schema(json.loads(self.json_), field + "json")
                except json.JSONDecodeError as exc:
                    raise InvalidRequestError(f"{field}json: not a JSON schema ({exc})", field + "json") from None
            return GrammarSpec.json_schema(self.json_, field + "json")
        if self.regex is not None:
            return GrammarSpec("regex", self.regex, field + "regex")
        if self.choice is not None:
            return GrammarSpec("choice", json.dumps(self.choice), field + "choice")
        if self.grammar is not None:
            return GrammarSpec("grammar", self.grammar, field + "grammar")
        return GrammarSpec("json_object", "", field + "json_object")


def output_spec(response_format: ResponseFormat | None, structured: StructuredOutputs | None) -> GrammarSpec | None:
    """What the output must match, from whichever field asked (both at once is refused by the request model)."""
    if structured is not None:
        return structured.spec()
    return response_format.spec() if response_format is not None else None
