"""POST /v1/chat/completions (JSON or SSE): the chat template over `messages` (and `tools`), tool calls out.

Tool calls (server.api.tools): `required` and a named function are enforced by a grammar over the functions'
parameter schemas; `auto` output is parsed for the model's own <tool_call> blocks (Hermes format). Responses
carry `tool_calls` with ids; streams send them as OpenAI deltas (a named function's arguments as they come;
`required` and `auto` calls once complete, after any plain text).
"""
from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.api.auth import require_api_key
from server.api.call import Call
from server.api.generation import Choice, max_model_len, require_ready
from server.api.protocol import ChatCompletionRequest, ChatMessage
from server.api.tool_stream import ToolOutput, ToolStream
from server.api.tools import choice_mode, template_tool_calls, tool_grammar
from server.errors import InvalidRequestError

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    engine = request.app.state.engine
    require_ready(engine)
    mode = choice_mode(body.tools, body.tool_choice)
    prompt = await run_in_threadpool(chat_prompt_ids, engine.tokenizer, body.messages, body)
    call = Call(request, body, "chatcmpl", "chat.completion", logprobs=body.logprobs, top=body.top_logprobs or 0)
    prompt = call.truncate(prompt)
    max_tokens = next((m for m in (body.max_completion_tokens, body.max_tokens) if m is not None),
                      max(1, max_model_len(engine) - len(prompt)))
    spec = tool_grammar(body.tools, body.tool_choice, body.parallel_tool_calls is not False) if mode else None
    grammar = await call.grammar(spec or body.output_spec())
    generation = await call.start([prompt], [max_tokens], body.prompt_logprobs, grammar)
    tools = ToolOutput(mode, body.tool_choice, body.parallel_tool_calls is not False)
    return await call.respond(request, generation, _chat_delta(call, tools),
                              lambda choices: _chat_response(call, tools, prompt, choices))


def _chat_response(call: Call, tools: ToolOutput, prompt: list[int], choices: list[Choice]) -> dict:
    body, extra = call.body, {}
    if body.prompt_logprobs is not None:
        extra["prompt_logprobs"] = call.shapes.vllm_prompt(prompt, choices[0].prompt_logprobs, body.prompt_logprobs)
    if body.return_token_ids:
        extra["prompt_token_ids"] = prompt
    return call.response([_chat_item(call, tools, c) for c in choices], choices, **extra)


def _chat_item(call: Call, tools: ToolOutput, c: Choice) -> dict:
    message, finish_reason = tools.message(c.text, c.finish_reason)
    item = {"index": c.index, "message": message,
            "logprobs": call.shapes.chat(c.token_ids, c.logprobs, c.top_logprobs) if call.logprobs else None,
            "finish_reason": finish_reason, "stop_reason": c.stop_reason}
    return item | ({"token_ids": c.token_ids} if call.body.return_token_ids else {})


RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "return_tensors", "return_dict", "chat_template", "padding",
                            "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask"}


def chat_prompt_ids(tokenizer, messages: list[ChatMessage], options=None) -> list[int]:
    """Token ids of the chat template applied to `messages` (and `options`' tools, add_generation_prompt,
    continue_final_message and chat_template_kwargs: a ChatCompletionRequest or a tokenize request).

    transformers may return a list, a list of lists, or a BatchEncoding/dict holding input_ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template; use /v1/completions", "messages")
    conversation = [_message_dict(m) for m in messages]
    kwargs = dict(add_generation_prompt=getattr(options, "add_generation_prompt", True),
                  continue_final_message=getattr(options, "continue_final_message", False))
    extra = getattr(options, "chat_template_kwargs", None) or {}
    reserved = sorted(set(extra) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}: the server renders and "
                                  "tokenizes the template itself (a template of your own is not accepted)",
                                  "chat_template_kwargs")
    kwargs.update(extra)  # vLLM: they override the fields above
    tools = getattr(options, "tools", None)
    if tools:
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in tools]
    try:
        out = tokenizer.apply_chat_template(conversation, tokenize=True, **kwargs)
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
    if message.tool_calls:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id:
        out["tool_call_id"] = message.tool_call_id
    return out


def _chat_delta(call: Call, tools: ToolOutput):
    streams: dict[int, ToolStream] = {}

    def delta(choice: Choice, out, first: bool) -> list[dict]:
        items = []
        if first:
            items.append({"index": choice.index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None})
        stream = streams.setdefault(choice.index, tools.stream())
        message, finish_reason = stream.feed(out.text, out.finish_reason, bool(out.token_ids))
        if message or out.finish_reason or call.logprobs:
            logprobs = call.shapes.chat(out.token_ids, out.logprobs or [], out.top_logprobs) if call.logprobs else None
            items.append({"index": choice.index, "delta": message, "logprobs": logprobs,
                          "finish_reason": finish_reason, "stop_reason": out.stop_reason}
                         | ({"token_ids": out.token_ids} if call.body.return_token_ids else {}))
        return items
    return delta
