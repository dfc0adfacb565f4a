"""Call: one OpenAI request in flight (completions or chat): its ids, its engine requests, and how its output
is shaped (usage, envelopes, SSE chunks)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.errors import client_message, error_payload
from server.api.generation import (
    Choice,
    EventStream,
    Generation,
    adapters_for,
    client_gone,
    collect_unless_disconnected,
    max_model_len,
    new_id,
    output_error,
    raise_choice_error,
    sse,
    start_generation,
)
from server.api.logprobs import LogprobShapes
from server.api.protocol import SamplingFields, Usage
from server.errors import InvalidRequestError, SwapserveError

log = logging.getLogger("swapserve.api")
Delta = Callable[[Choice, object, bool], list[dict]]  # (choice so far, output increment, first?) -> chunk items


class Call:
    def __init__(self, request: Request, body: SamplingFields, prefix: str, kind: str, logprobs: bool,
                 top: int = 0) -> None:
        self.app, self.body, self.kind, self.logprobs, self.top = request.app, body, kind, logprobs, top
        self.engine = request.app.state.engine
        self.id, self.created = new_id(prefix, request), int(time.time())
        self.model = body.model or self.engine.model_name
        self.request = request
        self.adapters = adapters_for(self.engine, body.model, body.adapters)
        self.chunk_suffix = ".chunk" if kind == "chat.completion" else ""
        self.shapes = LogprobShapes(self.engine.tokenizer)
        self.prompts: list[list[int]] = []

    def truncate(self, prompt: list[int]) -> list[int]:
        """vLLM's truncate_prompt_tokens: keep the prompt's last k tokens (-1: --max-model-len)."""
        k = self.body.truncate_prompt_tokens
        if k is None:
            return prompt
        limit = max_model_len(self.engine)
        if k > limit:
            raise InvalidRequestError(f"truncate_prompt_tokens ({k}) must be <= the model's context length "
                                      f"({limit}), or -1", "truncate_prompt_tokens")
        return prompt[-(limit if k == -1 else k):] if k else prompt

    async def grammar(self, spec):
        """The compiled grammar of ``spec`` (None for none), compiled off the event loop; 400 if it does not."""
        if spec is None:
            return None
        return await run_in_threadpool(self.engine.grammar.compile, spec)

    async def start(self, prompts: list[list[int]], max_tokens: list[int], prompt_logprobs: int | None = None,
                    grammar=None) -> Generation:
        """One engine request per prompt and choice (each computes its prompt's logprobs when asked: a stream
        shows them with each choice's first chunk)."""
        n, limit = self.body.n, self.app.state.server_config.max_prompts
        if n * len(prompts) > limit:
            raise InvalidRequestError(f"n * number of prompts must be <= {limit} (--max-prompts)", "prompt")
        self.prompts = prompts
        defaults = getattr(self.engine, "sampling_defaults", None)
        jobs = [(p, self.body.sampling_params(m, self.logprobs, j, self.top, prompt_logprobs, grammar,
                                              defaults))
                for p, m in zip(prompts, max_tokens) for j in range(n)]
        field = "adapters" if self.body.adapters is not None else None
        return await start_generation(self.request, jobs, self.adapters, self.id, field, user=self.body.user)

    def prompt_of(self, choice: Choice) -> list[int]:
        return self.prompts[choice.index // self.body.n]

    def usage(self, choices: list[Choice], one: bool = False) -> dict:
        """The request's usage; ``one``: that of the one choice given (its prompt and its own tokens)."""
        first = choices if one else [c for c in choices if c.index % self.body.n == 0]  # n choices share a prompt
        prompt = sum(c.num_prompt_tokens for c in first)
        completion = sum(len(c.token_ids) for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details={"cached_tokens": sum(c.num_cached_tokens for c in first)}).model_dump()

    def envelope(self, choices: list[dict], object_suffix: str = "") -> dict:
        return {"id": self.id, "object": self.kind + object_suffix, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, items: list[dict], choices: list[Choice], **extra) -> dict:
        return {**self.envelope(items), "system_fingerprint": None, "usage": self.usage(choices), **extra}

    def token_ids_fields(self, choice: Choice, token_ids: list[int], first: bool) -> dict:
        """vLLM's return_token_ids: the choice's token ids (and, first, its prompt's)."""
        if not self.body.return_token_ids:
            return {}
        return {"token_ids": token_ids, **({"prompt_token_ids": self.prompt_of(choice)} if first else {})}

    async def respond(self, request: Request, generation: Generation, delta: Delta,
                      build: Callable[[list[Choice]], dict]):
        """SSE chunks from ``delta`` when the body asks for a stream; else every choice, collected, through
        ``build``; 499 when the client left first (everything aborted)."""
        if self.body.stream:
            return EventStream(self.stream(generation, delta), generation.abort)
        choices = await collect_unless_disconnected(request, generation)
        if choices is None:
            return client_gone()
        raise_choice_error(choices)
        return build(choices)

    async def stream(self, generation: Generation, delta: Delta) -> AsyncIterator[str]:
        """SSE chunks: one per output increment, then the usage chunk if asked for, then [DONE]."""
        choices = [Choice(i) for i in range(len(generation.streams))]
        try:
            async with aclosing(generation.events()) as events:
                async for i, out in events:
                    first = not choices[i].token_ids and not choices[i].finish_reason
                    choices[i].add(out)
                    if out.error:
                        raise output_error(out)
                    for k, item in enumerate(delta(choices[i], out, first)):
                        yield sse(json.dumps({**self.envelope([item], self.chunk_suffix), **self._usage_field(choices[i]),
                                              **self._chunk_prompt_ids(choices[i], first and k == 0)}))
            if self.body.include_usage:
                yield sse(json.dumps({**self.envelope([], self.chunk_suffix), "usage": self.usage(choices)}))
        except SwapserveError as exc:
            yield sse(json.dumps(error_payload("/v1", exc.status_code, client_message(self.request, exc), exc.error_type,
                                               exc.param)))
        except Exception:  # the status line is already sent: report in-band, then end the stream properly
            log.exception("stream %s failed", self.id)
            yield sse(json.dumps(error_payload("/v1", 500, "internal error", "internal_error")))
        yield sse("[DONE]")

    def _chunk_prompt_ids(self, choice: Choice, first: bool) -> dict:
        """vLLM's return_token_ids in a chat stream: the prompt's ids on each choice's first chunk, beside its
        choices (a completion stream has them in the choice: token_ids_fields)."""
        if first and self.chunk_suffix and self.body.return_token_ids:
            return {"prompt_token_ids": self.prompt_of(choice)}
        return {}

    def _usage_field(self, choice: Choice) -> dict:
        """A chunk's usage: with continuous_usage_stats, the chunk's choice's so far (vLLM's, per choice)."""
        if self.body.continuous_usage:
            return {"usage": self.usage([choice], one=True)}
        return {"usage": None} if self.body.include_usage else {}
