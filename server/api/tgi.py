"""Text Generation Inference routes: POST /generate (JSON) and POST /generate_stream (SSE).

`parameters.adapter_id` names the adapter (absent or the served model name = base model); `parameters.adapters`
instead asks for a mixture [{"name", "scale"}, ...] (server.api.generation.adapters_for). Token events carry
{"id", "text", "logprob", "special"}; concatenating the events' token texts gives generated_text.
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import require_api_key
from server.api.errors import client_message, error_payload
from server.api.generation import (
    Choice,
    EventStream,
    Generation,
    adapters_for,
    client_gone,
    collect_unless_disconnected,
    encode_text,
    new_id,
    output_error,
    raise_choice_error,
    require_ready,
    sse,
    start_generation,
    token_text,
)
from server.api.protocol import TGIRequest
from server.engine.detokenizer import Detokenizer
from server.engine.request import Request as EngineRequest, SamplingParams
from server.errors import SwapserveError

log = logging.getLogger("swapserve.api")
router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/generate")
async def generate(body: TGIRequest, request: Request):
    """{"generated_text": str, "details"?: {finish_reason, generated_tokens, seed, prefill, tokens}}."""
    generation = await _start(request, body, logprobs=body.parameters.details)
    choices = await collect_unless_disconnected(request, generation)
    if choices is None:
        return client_gone()
    raise_choice_error(choices)
    choice, params = choices[0], body.parameters
    out = {"generated_text": (body.inputs if params.return_full_text else "") + choice.text}
    if params.details:
        tokenizer = request.app.state.engine.tokenizer
        tokens = [_token(tokenizer, t, lp, token_text(tokenizer, t)) for t, lp in _with_logprobs(choice)]
        out["details"] = {"finish_reason": finish_reason(choice), "generated_tokens": len(tokens),
                          "seed": params.seed, "prefill": _prefill(tokenizer, generation.prompts[0], choice),
                          "tokens": tokens}
        if params.top_n_tokens:
            out["details"]["top_tokens"] = [_top_tokens(tokenizer, top) for top in choice.top_logprobs]
    return out


@router.post("/generate_stream")
async def generate_stream(body: TGIRequest, request: Request):
    """SSE: one event per token; the last also carries generated_text (and details when asked for)."""
    generation = await _start(request, body, logprobs=True)
    return EventStream(_events(request, body, generation), generation.abort)


async def _start(request: Request, body: TGIRequest, logprobs: bool) -> Generation:
    engine = request.app.state.engine
    require_ready(engine)
    params = body.parameters
    prompt = await encode_text(engine, body.inputs)
    if params.truncate:
        prompt = prompt[-params.truncate:]
    adapters = adapters_for(engine, params.adapter_id, params.adapters, ("parameters.adapter_id", "parameters.adapters"))
    grammar = None
    if params.grammar is not None:
        grammar = await run_in_threadpool(engine.grammar.compile, params.grammar.spec())
    field = "parameters.adapters" if params.adapters is not None else None
    return await start_generation(request, [(prompt, params.sampling_params(logprobs, grammar))], adapters,
                                  new_id("tgi", request), field)


async def _events(request: Request, body: TGIRequest, generation: Generation) -> AsyncIterator[str]:
    tokenizer = request.app.state.engine.tokenizer
    choice, index = Choice(0), 0
    texts = TokenTexts(tokenizer, generation.prompts[0] if generation.prompts else [])
    try:
        async with aclosing(generation.events()) as events:
            async for _, out in events:
                choice.add(out)
                if out.error:
                    raise output_error(out)
                if out.finish_reason == "abort":  # the server is stopping (a client that left reads nothing)
                    raise SwapserveError("the request was aborted before it finished (the server is shutting "
                                         "down); retry it")
                tokens = _increment_tokens(tokenizer, out, texts)
                tops = out.top_logprobs or [[]] * len(tokens)
                for k, token in enumerate(tokens):
                    index += 1
                    last = out.finished and k == len(tokens) - 1
                    event = _stream_event(tokenizer, body, choice, index, token, last)
                    if body.parameters.top_n_tokens:
                        event["top_tokens"] = _top_tokens(tokenizer, tops[k] if k < len(tops) else [])
                    yield sse(json.dumps(event))
    except SwapserveError as exc:
        yield sse(json.dumps(error_payload("/generate_stream", exc.status_code, client_message(request, exc),
                                           exc.error_type)))
    except Exception:  # the status line is already sent: report in-band
        log.exception("generate_stream failed")
        yield sse(json.dumps(error_payload("/generate_stream", 500, "internal error", "internal_error")))


class TokenTexts:
    """Each streamed token's own text, as TGI sends it: decoded incrementally (empty while it ends inside a
    character), never held back for a stop sequence, which only shapes ``generated_text``."""

    def __init__(self, tokenizer, prompt: list[int]) -> None:
        self.detokenizer = Detokenizer(tokenizer, set())
        self.req = EngineRequest("tgi-stream", list(prompt), SamplingParams(max_tokens=1 << 30))

    def next(self, token_id: int, last: bool) -> str:
        self.req.output_token_ids.append(token_id)
        self.req.finish_reason = "length" if last else None  # the last one flushes a character cut short
        return self.detokenizer.delta(self.req)


def _increment_tokens(tokenizer, out, texts: TokenTexts) -> list[dict]:
    """Token dicts of one increment, each with its own text. A final increment without tokens (a stop that
    came with no new token) still yields one event to carry the end."""
    logprobs = out.logprobs or [None] * len(out.token_ids)
    n = len(out.token_ids)
    tokens = [_token(tokenizer, t, lp, texts.next(t, out.finished and k == n - 1))
              for k, (t, lp) in enumerate(zip(out.token_ids, logprobs))]
    if not tokens and out.finished:
        tokens = [{"id": tokenizer.eos_token_id or 0, "text": "", "logprob": None, "special": True}]
    return tokens


def _stream_event(tokenizer, body: TGIRequest, choice: Choice, index: int, token: dict, last: bool) -> dict:
    event = {"index": index, "token": token, "generated_text": None, "details": None}
    if last:
        event["generated_text"] = (body.inputs if body.parameters.return_full_text else "") + choice.text
        if body.parameters.details:
            event["details"] = {"finish_reason": finish_reason(choice),
                                "generated_tokens": len(choice.token_ids), "seed": body.parameters.seed,
                                "input_length": choice.num_prompt_tokens}
    return event


def _prefill(tokenizer, prompt: list[int], choice: Choice) -> list[dict]:
    """TGI's details.prefill (with decoder_input_details): each prompt token, the first without a logprob."""
    if choice.prompt_logprobs is None:
        return []
    return [_token(tokenizer, t, None if e is None else e[0], token_text(tokenizer, t))
            for t, e in zip(prompt, choice.prompt_logprobs)]


def _top_tokens(tokenizer, top: list[tuple[int, float]]) -> list[dict]:
    """TGI's top_tokens for one position: the top_n_tokens most likely, as token dicts."""
    return [_token(tokenizer, i, lp, token_text(tokenizer, i)) for i, lp in top]


def _token(tokenizer, token_id: int, logprob: float | None, text: str) -> dict:
    special = token_id in set(getattr(tokenizer, "all_special_ids", []) or [])
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def _with_logprobs(choice: Choice) -> list[tuple[int, float | None]]:
    logprobs = choice.logprobs if len(choice.logprobs) == len(choice.token_ids) else [None] * len(choice.token_ids)
    return list(zip(choice.token_ids, logprobs))


def finish_reason(choice: Choice) -> str:
    """TGI's reasons: eos_token (ended on EOS), stop_sequence (stop string/token), length (budget or abort)."""
    if choice.finish_reason != "stop":
        return "length"
    return "eos_token" if choice.stop_reason is None else "stop_sequence"
