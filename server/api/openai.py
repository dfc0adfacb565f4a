"""OpenAI-compatible routes: /v1/completions (JSON or SSE), /v1/models and /v1/models/{id}; chat is in chat.py.

`model` names the base model (its served name, or omitted) or an adapter. `adapters` ([{"name", "scale"}, ...])
instead asks for a weighted mixture of adapters or one adapter at a strength; `model` is then the base model or
omitted (naming an adapter there as well is refused: server.api.generation.adapters_for). Streams end with `data: [DONE]`;
with stream_options.include_usage the last chunk before it has `choices: []` and the usage.
echo + logprobs and prompt_logprobs come from the engine's prompt logprobs, computed in the same batched
forward as the prompt (SamplingParams.prompt_logprobs); max_tokens 0 with echo returns the prompt alone.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.api.auth import require_api_key, tenant_of
from server.api.call import Call
from server.api.generation import Choice, encode_text, max_model_len, require_ready
from server.api.protocol import CompletionRequest, ModelCard, ModelList
from server.api.tenants import visible
from server.errors import UnknownAdapterError

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    """The base model, then every adapter the engine knows (parent = base), as vLLM lists LoRA modules; for a
    tenant's key only those it may use."""
    return ModelList(data=_cards(request))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    """One entry of /v1/models (OpenAI's retrieve); 404 for a name the server does not list (to this key)."""
    card = next((c for c in _cards(request) if c.id == model_id), None)
    if card is None:
        raise UnknownAdapterError(f"The model `{model_id}` does not exist.", "model")
    return card


def _cards(request: Request) -> list[ModelCard]:
    engine, created, tenant = request.app.state.engine, request.app.state.created, tenant_of(request)
    max_len = max_model_len(engine)
    # root is where a model came from (vLLM's: a path); a tenant key gets the name instead of server paths
    cards = [ModelCard(id=engine.model_name, created=created, root=engine.model_name if tenant else engine.config.model,
                       max_model_len=max_len, permission=[_permission(created)])] if visible(tenant, None) else []
    for adapter in engine.list_adapters():
        if not visible(tenant, adapter["name"]):
            continue
        cards.append(ModelCard(id=adapter["name"], created=created,
                               root=adapter["name"] if tenant else adapter.get("source"),
                               parent=engine.model_name, max_model_len=max_len, permission=[_permission(created)],
                               version=adapter.get("version")))
    return cards


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    engine = request.app.state.engine
    require_ready(engine)
    call = Call(request, body, "cmpl", "text_completion", logprobs=body.logprobs is not None,
                top=body.logprobs or 0)
    prompts = [call.truncate(p) for p in await _completion_prompts(engine, body.prompt)]
    grammar = await call.grammar(body.output_spec())
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    generation = await call.start(prompts, [max_tokens] * len(prompts), body.prompt_logprobs_k, grammar)
    echo = None
    if body.echo:  # a text prompt echoes as given (not decoded back: no BOS the tokenizer added), unless truncated
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        keep = body.truncate_prompt_tokens is None and isinstance(texts[0], str)
        echo = [texts[i] if keep else engine.tokenizer.decode(p) for i, p in enumerate(prompts)]
    return await call.respond(request, generation, _completion_delta(call, echo),
                              lambda choices: call.response([_completion_item(call, c, echo) for c in choices], choices))


def _completion_item(call: Call, c: Choice, echo: list[str] | None) -> dict:
    body = call.body
    echoed = echo[c.index // body.n] if echo else ""
    item = {"index": c.index, "text": echoed + c.text,
            "logprobs": _logprobs(call, c, c.token_ids, c.logprobs, c.top_logprobs, echoed),
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
    if body.prompt_logprobs is not None:
        item["prompt_logprobs"] = call.shapes.vllm_prompt(call.prompt_of(c), c.prompt_logprobs, body.prompt_logprobs)
    return item | call.token_ids_fields(c, c.token_ids, True)


def _logprobs(call: Call, choice: Choice, token_ids, logprobs, tops, echoed: str, offset: int = 0) -> dict | None:
    """The legacy logprobs of generated tokens, after the echoed prompt's when ``echoed``."""
    if not call.logprobs:
        return None
    out = call.shapes.completion(token_ids, logprobs, tops, offset + len(echoed))
    if echoed:
        prompt = call.shapes.echoed(call.prompt_of(choice), choice.prompt_logprobs, call.top)
        out = {key: prompt[key] + out[key] for key in out}
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


def _completion_delta(call: Call, echo: list[str] | None):
    def delta(choice: Choice, out, first: bool) -> list[dict]:
        echoed = echo[choice.index // call.body.n] if echo and first else ""
        text = echoed + out.text
        # new tokens whose text is held back (half of a multi-byte character) still make a chunk, with empty
        # text, as in vLLM: one chunk per step's tokens, so a client timing tokens by chunks sees each one
        if not (text or out.token_ids or out.finish_reason or call.logprobs):
            return []
        offset = len(choice.text) - len(out.text)
        logprobs = _logprobs(call, choice, out.token_ids, out.logprobs or [], out.top_logprobs, echoed, offset)
        return [{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
                 "stop_reason": out.stop_reason} | call.token_ids_fields(choice, out.token_ids, first)]
    return delta
