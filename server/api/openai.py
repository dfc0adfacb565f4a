"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (JSON or SSE) and /v1/models.

`model` names the base model (its served name, or omitted) or an adapter. Streams end with `data: [DONE]`;
with stream_options.include_usage the last chunk before it has `choices: []` and the usage.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from functools import partial

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import require_api_key
from server.api.errors import error_payload
from server.api.generation import (
    Choice,
    EventStream,
    Generation,
    adapter_for,
    client_gone,
    collect_unless_disconnected,
    encode_text,
    error_label,
    max_model_len,
    new_id,
    output_error,
    raise_choice_error,
    require_ready,
    sse,
    token_text,
)
from server.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingFields,
    Usage,
)
from server.api.settings import MAX_CHOICES
from server.errors import InvalidRequestError, SwapserveError

log = logging.getLogger("swapserve.api")
router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The base model, then every adapter the engine knows (parent = base), as vLLM lists LoRA modules."""
    engine, created = request.app.state.engine, request.app.state.created
    max_len = max_model_len(engine)
    cards = [ModelCard(id=engine.model_name, created=created, root=engine.config.model, max_model_len=max_len,
                       permission=[_permission(created)])]
    for adapter in engine.list_adapters():
        cards.append(ModelCard(id=adapter["name"], created=created, root=adapter.get("source"),
                               parent=engine.model_name, max_model_len=max_len, permission=[_permission(created)]))
    return ModelList(data=cards)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine = request.app.state.engine
    require_ready(engine)
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported (no prompt logprobs)", "echo")
    prompts = await _completion_prompts(engine, body.prompt)
    call = _Call(request, body, "cmpl", "text_completion", logprobs=body.logprobs is not None,
                 top=body.logprobs or 0)
    generation = await call.start(prompts, [body.max_tokens or 16] * len(prompts))
    echo = [engine.tokenizer.decode(p) if not isinstance(body.prompt, str) else body.prompt for p in prompts] \
        if body.echo else None
    if body.stream:
        return EventStream(call.stream(generation, _completion_delta(call, echo)), generation.abort)
    choices = await collect_unless_disconnected(request, generation)
    if choices is None:
        return client_gone()
    raise_choice_error(choices)
    items = [{"index": c.index, "text": (echo[c.index // body.n] if echo else "") + c.text,
              "logprobs": call.completion_logprobs(c.token_ids, c.logprobs, c.top_logprobs),
              "finish_reason": c.finish_reason, "stop_reason": None} for c in choices]
    return call.response(items, choices)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = request.app.state.engine
    require_ready(engine)
    prompt = await run_in_threadpool(chat_prompt_ids, engine.tokenizer, body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, max_model_len(engine) - len(prompt))
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs: true", "top_logprobs")
    call = _Call(request, body, "chatcmpl", "chat.completion", logprobs=body.logprobs, top=body.top_logprobs or 0)
    generation = await call.start([prompt], [max_tokens])
    if body.stream:
        return EventStream(call.stream(generation, _chat_delta(call)), generation.abort)
    choices = await collect_unless_disconnected(request, generation)
    if choices is None:
        return client_gone()
    raise_choice_error(choices)
    items = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
              "logprobs": call.chat_logprobs(c.token_ids, c.logprobs, c.top_logprobs),
              "finish_reason": c.finish_reason,
              "stop_reason": None} for c in choices]
    return call.response(items, choices)


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Token ids of the chat template applied to `messages` with the assistant turn opened.

    transformers may return a list, a list of lists, or a BatchEncoding/dict holding input_ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; use /v1/completions", "messages")
    conversation = [_message_dict(m) for m in messages]
    try:
        out = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja2 errors (e.g. roles must alternate) are the caller's to fix
        raise InvalidRequestError(f"chat template failed: {exc}", "messages") from exc
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    if len(ids) and isinstance(ids[0], list | tuple):
        ids = ids[0]
    return [int(t) for t in ids]


def _message_dict(message: ChatMessage) -> dict:
    content = message.content
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise InvalidRequestError("only text content parts are supported", "messages")
        content = "".join(part.text or "" for part in content)
    out = {"role": message.role, "content": content or ""}
    if message.name:
        out["name"] = message.name
    return out


async def _completion_prompts(engine, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await encode_text(engine, prompt)]
    if isinstance(prompt[0], str):
        return [await encode_text(engine, p) for p in prompt]
    return [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]


def _permission(created: int) -> dict:
    return {"id": f"modelperm-{created}", "object": "model_permission", "created": created,
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
            "organization": "*", "group": None, "is_blocking": False}


class _Call:
    """One OpenAI request in flight: its ids, its engine requests, and how its output is shaped."""

    def __init__(self, request: Request, body: SamplingFields, prefix: str, kind: str, logprobs: bool,
                 top: int = 0) -> None:
        self.app, self.body, self.kind, self.logprobs, self.top = request.app, body, kind, logprobs, top
        self.engine = request.app.state.engine
        self.id, self.created = new_id(prefix), int(time.time())
        self.model = body.model or self.engine.model_name
        self.adapter = adapter_for(self.engine, body.model)
        self.chunk_suffix = ".chunk" if kind == "chat.completion" else ""

    async def start(self, prompts: list[list[int]], max_tokens: list[int]) -> Generation:
        n = self.body.n
        if n * len(prompts) > MAX_CHOICES:
            raise InvalidRequestError(f"n * number of prompts must be <= {MAX_CHOICES}", "n")
        jobs = [(p, self.body.sampling_params(m, self.logprobs, j, self.top)) for p, m in zip(prompts, max_tokens)
                for j in range(n)]
        try:
            return await Generation.start(self.engine, jobs, self.adapter, self.id)
        except SwapserveError as exc:
            self.app.state.metrics.record_error(error_label(self.engine, self.adapter, exc), exc.error_type)
            raise

    def usage(self, choices: list[Choice]) -> dict:
        first = [c for c in choices if c.index % self.body.n == 0]  # the n choices of a prompt share it
        prompt = sum(c.num_prompt_tokens for c in first)
        completion = sum(len(c.token_ids) for c in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details={"cached_tokens": sum(c.num_cached_tokens for c in first)}).model_dump()

    def envelope(self, choices: list[dict], object_suffix: str = "") -> dict:
        return {"id": self.id, "object": self.kind + object_suffix, "created": self.created, "model": self.model,
                "choices": choices}

    def response(self, items: list[dict], choices: list[Choice]) -> dict:
        return {**self.envelope(items), "system_fingerprint": None, "usage": self.usage(choices)}

    def completion_logprobs(self, token_ids: list[int], logprobs: list[float], tops: list | None = None,
                            offset: int = 0) -> dict | None:
        """The legacy shape. top_logprobs[i]: the ``logprobs`` most likely tokens' text -> logprob, plus the
        chosen token (so up to logprobs + 1 entries, as vLLM)."""
        if not self.logprobs:
            return None
        text = partial(token_text, self.engine.tokenizer)
        tokens = [text(t) for t in token_ids]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        tops = tops or [[]] * len(tokens)
        return {"tokens": tokens, "token_logprobs": list(logprobs), "text_offset": offsets,
                "top_logprobs": [{**{text(i): v for i, v in top}, t: lp} for t, lp, top in zip(tokens, logprobs, tops)]}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[float], tops: list | None = None) -> dict | None:
        """{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}, ...]}]}."""
        if not self.logprobs:
            return None

        def entry(token_id: int, lp: float) -> dict:
            token = token_text(self.engine.tokenizer, token_id)
            return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

        tops = tops or [[]] * len(token_ids)
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, lp, top in zip(token_ids, logprobs, tops)]}

    async def stream(self, generation: Generation, delta) -> AsyncIterator[str]:
        """SSE chunks: one per output increment, then the usage chunk if asked for, then [DONE]."""
        choices = [Choice(i) for i in range(len(generation.streams))]
        usage_field = {"usage": None} if self.body.include_usage else {}
        try:
            async with aclosing(generation.events()) as events:
                async for i, out in events:
                    first = not choices[i].token_ids and not choices[i].finish_reason
                    choices[i].add(out)
                    if out.error:
                        raise output_error(out.error)
                    for item in delta(choices[i], out, first):
                        yield sse(json.dumps({**self.envelope([item], self.chunk_suffix), **usage_field}))
            if self.body.include_usage:
                yield sse(json.dumps({**self.envelope([], self.chunk_suffix), "usage": self.usage(choices)}))
        except SwapserveError as exc:
            yield sse(json.dumps(error_payload("/v1", exc.status_code, exc.message, exc.error_type, exc.param)))
        except Exception:  # the status line is already sent: report in-band, then end the stream properly
            log.exception("stream %s failed", self.id)
            yield sse(json.dumps(error_payload("/v1", 500, "internal error", "internal_error")))
        yield sse("[DONE]")


def _completion_delta(call: _Call, echo: list[str] | None):
    def delta(choice: Choice, out, first: bool) -> list[dict]:
        text = (echo[choice.index // call.body.n] if echo and first else "") + out.text
        if not (text or out.finish_reason or call.logprobs):
            return []  # nothing to show yet (e.g. half of a multi-byte character)
        offset = len(choice.text) - len(out.text)
        return [{"index": choice.index, "text": text,
                 "logprobs": call.completion_logprobs(out.token_ids, out.logprobs or [], out.top_logprobs, offset),
                 "finish_reason": out.finish_reason, "stop_reason": None}]
    return delta


def _chat_delta(call: _Call):
    def delta(choice: Choice, out, first: bool) -> list[dict]:
        items = []
        if first:
            items.append({"index": choice.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None})
        if out.text or out.finish_reason or call.logprobs:
            items.append({"index": choice.index, "delta": {"content": out.text} if out.text else {},
                          "logprobs": call.chat_logprobs(out.token_ids, out.logprobs or [], out.top_logprobs),
                          "finish_reason": out.finish_reason, "stop_reason": None})
        return items
    return delta
