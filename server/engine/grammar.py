"""GrammarCompiler: a structured-output spec (JSON schema, regex, EBNF grammar, choice) compiled once for this
model's tokenizer, cached, and refused with the field to fix when it does not compile.

The library is xgrammar (vLLM's and SGLang's default backend). Measured on this project's 2-core CPU with
SmolLM2's 49,152-token vocabulary (bench/structured.py holds the cell that uses it):

| library (version)     | compile a 3-field JSON schema | mask + accept per token | apply 32 rows' masks |
|-----------------------|-------------------------------|-------------------------|----------------------|
| xgrammar 0.2.9        | 5.3 ms                        | 11 us                   | 0.06 ms (C++ kernel) |
| llguidance 1.9.1      | 1.2 ms                        | 82 us                   | 1,240 ms (torch)     |
| outlines-core 0.2.14  | 26 ms (regex index)           | (regex only, no CFG)    | --                   |

xgrammar: EBNF grammars, JSON schema, regex and structural tags, a CPU kernel for the mask, rollback, and it
is maintained by the MLC team with weekly releases. Its own compile cache is unbounded (cache_limit_bytes=-1),
so it is off here and this class keeps a bounded LRU instead.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

from server.errors import InvalidRequestError

# JSON grammars are compact (xgrammar's any_whitespace=False: separators ", " and ": ", no newlines), as
# OpenAI's structured outputs are: with free whitespace a weak model fills every gap (measured on the test
# model: 16 tabs per gap, the budget spent before the second key), the known failure vLLM's
# disable_any_whitespace exists for.
KINDS = ("json", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match. kind: json (value: a JSON schema, as canonical JSON text),
    json_object (any JSON object; value ""), regex, grammar (xgrammar EBNF: ``root ::= ...``), choice (value: a
    JSON list of the allowed strings). ``field`` names the request field it came from (for errors)."""

    kind: str
    value: str
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GrammarSpec kind must be one of {KINDS}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict | str, field: str) -> "GrammarSpec":
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True, separators=(",", ":"))
        return cls("json", text, field)


class GrammarCompiler:
    """Compiles GrammarSpecs for one tokenizer; thread-safe (requests compile on the HTTP server's threads).

    The tokenizer's vocabulary is analysed once, at the first compile (~0.2 s for a 49k vocabulary), not at
    start-up: servers that never see a constrained request never pay for it.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int], cache_size: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler = None

    def compile(self, spec: GrammarSpec):
        """The xgrammar CompiledGrammar of ``spec`` (the same object for an equal spec while cached); raises
        InvalidRequestError naming ``spec.field`` when it does not compile."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        compiler = self._xgrammar()
        try:
            if spec.kind == "json":
                return compiler.compile_json_schema(spec.value, any_whitespace=False)
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if spec.kind == "regex":
                return compiler.compile_regex(spec.value)
            if spec.kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
            return compiler.compile_grammar(spec.value)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse/schema errors
            raise InvalidRequestError(f"{spec.field}: the {_what(spec.kind)} does not compile: "
                                      f"{_first_line(exc)}", spec.field) from None

    def _xgrammar(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                               stop_token_ids=self.stop_token_ids)
                self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler


def choice_grammar(choices: list[str]) -> str:
    """EBNF accepting exactly one of ``choices`` (JSON string literals are valid EBNF literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _what(kind: str) -> str:
    return {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
            "grammar": "grammar (xgrammar EBNF, e.g. root ::= \"yes\" | \"no\")", "choice": "choice list"}[kind]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
