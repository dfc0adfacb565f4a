"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info (lm-eval's remote tokenizer
probes the last two). Every model the server lists (the base and its adapters) shares one tokenizer.

/tokenize   {"prompt", "add_special_tokens": true} or {"messages", "add_generation_prompt": true,
            "continue_final_message", "add_special_tokens": false, "tools", "chat_template_kwargs"}, both with
            "return_token_strs" -> {"count", "max_model_len", "tokens", "token_strs"}
/detokenize {"tokens"} -> {"prompt"}
"""
from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field, StringConstraints, model_validator
from starlette.concurrency import run_in_threadpool

from server.api.auth import require_api_key, tenant_of
from server.api.chat import chat_prompt_ids
from server.api.generation import adapter_for, max_model_len, require_ready
from server.api.protocol import ChatMessage, Name, TokenId
from server.api.strict import Strict, refuse
from server.api.tools import Tools
from server.errors import InvalidRequestError

router = APIRouter(dependencies=[Depends(require_api_key)])
INFO_FIELDS = ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "clean_up_tokenization_spaces",
               "add_bos_token", "add_eos_token")


class TokenizeRequest(Strict):
    model: Name | None = None
    prompt: Annotated[str, StringConstraints(max_length=1 << 22)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template's)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: Tools | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise refuse(self, "prompt", "give exactly one of prompt and messages")
        if self.add_generation_prompt and self.continue_final_message and self.messages is not None:
            raise refuse(self, "continue_final_message", "continue_final_message and add_generation_prompt "
                         "cannot both be true")
        return self


class DetokenizeRequest(Strict):
    model: Name | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    engine = request.app.state.engine
    require_ready(engine)
    authorize_model(request, body.model)
    tokens = await run_in_threadpool(_tokens, engine.tokenizer, body)
    out = {"count": len(tokens), "max_model_len": max_model_len(engine), "tokens": tokens, "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(tokens)
    return out


def _tokens(tokenizer, body: TokenizeRequest) -> list[int]:
    if body.messages is None:
        return list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False))
    ids = chat_prompt_ids(tokenizer, body.messages, body)
    if body.add_special_tokens:  # the template writes its own special tokens; vLLM adds BOS on request
        ids = tokenizer.build_inputs_with_special_tokens(ids)
    return ids


def authorize_model(request: Request, model: str | None) -> None:
    """A tenant's key may name only a model it may use (403 otherwise); without a `model` these routes read
    the tokenizer every model shares, which any key may."""
    if model is not None:
        adapter = adapter_for(request.app.state.engine, model)
        request.app.state.tenancy.authorize(tenant_of(request), [adapter] if adapter else [],
                                            request.app.state.engine.model_name)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    engine = request.app.state.engine
    require_ready(engine)
    authorize_model(request, body.model)
    vocab = len(engine.tokenizer)
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:  # decode() would drop it silently
        raise InvalidRequestError(f"token id {bad} is out of the vocabulary [0, {vocab})", "tokens")
    return {"prompt": await run_in_threadpool(engine.tokenizer.decode, body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict:
    """vLLM's shape: the tokenizer's class and its configuration (special tokens, chat template)."""
    engine = request.app.state.engine
    require_ready(engine)
    tok = engine.tokenizer
    info = {"tokenizer_class": type(tok).__name__, "model_max_length": max_model_len(engine),
            "vocab_size": len(tok)}
    for name in INFO_FIELDS:
        value = getattr(tok, name, None)
        if value is not None:
            info[name] = value if isinstance(value, bool | int | float) else str(value)
    return info
