"""Pydantic request and response models of the OpenAI and TGI APIs.

Every numeric field is bounded and every list is capped, so no request can ask for unbounded work. No field is
silently ignored (server.api.strict.Strict): unknown ones are refused with 400 naming them, and known ones the
server does not implement (best_of > n, use_beam_search, suffix) are refused the same way. Sampling
fields keep vLLM's names; vLLM's extensions prompt_logprobs, structured_outputs, truncate_prompt_tokens and
return_token_ids are implemented. swapserve's own `adapters` (also TGI's `parameters.adapters`) asks for a weighted
mixture of adapters, or one adapter at a strength (server.api.generation.adapters_for).
"""
from __future__ import annotations

import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from server.api.settings import MAX_ADAPTERS_HARD, MAX_N, MAX_PROMPTS_HARD
from server.api.strict import Strict, refuse
from server.api.structured import ResponseFormat, StructuredOutputs, output_spec
from server.api.tools import ToolCall, ToolChoice, Tools
from server.engine.grammar import GrammarSpec
from server.engine.request import SamplingParams

I64 = 2**63 - 1
BIG = 1 << 20  # bound on token counts; the engine enforces --max-model-len on top
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
StopStr = Annotated[str, StringConstraints(max_length=512)]  # "" is accepted and ignored
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=BIG)]
Stop = StopStr | Annotated[list[StopStr], Field(max_length=16)] | None


class AdapterChoice(Strict):
    """One entry of ``adapters``: an adapter by name, at a strength. scale 1.0 by default; negative or 0 is allowed
    (0: loaded and held, contributes nothing). The engine checks finiteness and |scale| <= 100."""

    name: Name
    scale: float | None = 1.0  # null: 1.0


# A request's mixture (`adapters`): y = W x + sum_i scale_i * dW_i x. The engine caps it at
# --max-adapters-per-request; this cap only bounds the body.
Adapters = Annotated[list[AdapterChoice], Field(min_length=1, max_length=MAX_ADAPTERS_HARD)]


class StreamOptions(Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # every chunk carries the usage so far


# vLLM refuses max_tokens 0 (SamplingParams: "at least 1") but for an echo of the prompt alone
ZERO_TOKENS = "max_tokens must be at least 1; 0 asks for the prompt alone, which needs "


class SamplingFields(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Name | None = None
    adapters: Adapters | None = None  # a mixture or a scaled adapter; then `model` is the base model or omitted
    max_tokens: int | None = Field(None, ge=0, le=BIG)  # 0: the prompt alone (with echo / prompt_logprobs)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=BIG)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-I64 - 1, le=I64)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    min_tokens: int = Field(0, ge=0, le=BIG)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's; -1 (whole vocabulary) is refused
    truncate_prompt_tokens: int | None = Field(None, ge=-1, le=BIG)  # keep the last k (-1: --max-model-len)
    return_token_ids: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    use_beam_search: bool = False
    # OpenAI's: token id (a decimal string, as JSON keys are) -> a bias in [-100, 100] added to its logit
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1, max_length=BIG)] | None = None  # vLLM's
    include_stop_str_in_output: bool = False  # vLLM's
    skip_special_tokens: bool = True  # vLLM's
    cache_salt: Annotated[str, StringConstraints(min_length=1, max_length=1024)] | None = None  # vLLM's

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        if self.best_of is not None and self.best_of != self.n:
            raise refuse(self, "best_of", "best_of other than n is not supported (no best-of search); omit it")
        if self.use_beam_search:
            raise refuse(self, "use_beam_search", "beam search is not supported; omit use_beam_search")
        bad = next((k for k in self.logit_bias or () if not (k.isascii() and k.isdigit())), None)
        if bad is not None:
            raise refuse(self, "logit_bias", f"logit_bias keys are token ids (decimal strings); got {bad!r}")
        bad = next((k for k, v in (self.logit_bias or {}).items() if not -100.0 <= v <= 100.0), None)
        if bad is not None:
            raise refuse(self, "logit_bias", f"logit_bias values are between -100 and 100; got "
                         f"{self.logit_bias[bad]} for token {bad}")
        if self.stream_options is not None and not self.stream:
            raise refuse(self, "stream_options", "stream_options can only be given when stream is true")
        if self.stream and self.prompt_logprobs is not None:
            raise refuse(self, "prompt_logprobs", "prompt_logprobs are not available when stream is true")
        if self.response_format is not None and self.structured_outputs is not None:
            raise refuse(self, "structured_outputs", "give response_format or structured_outputs, not both")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's: only together with include_usage (alone it does nothing)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    def output_spec(self) -> GrammarSpec | None:
        return output_spec(self.response_format, self.structured_outputs)

    def sampling_params(self, max_tokens: int, logprobs: bool, index: int, top_logprobs: int = 0,
                        prompt_logprobs: int | None = None, grammar=None,
                        defaults: dict | None = None) -> SamplingParams:
        """Engine parameters for choice `index`: choices of one seeded request get seeds seed, seed+1, ...
        ``defaults``: the model's sampling defaults (generation_config.json) for fields the request omits."""
        stop = [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                 if getattr(self, k) is not None}
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                    **(defaults or {}), **given}
        return SamplingParams(
            max_tokens=max_tokens, **sampling,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else self.seed + index, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs if logprobs else 0,
            prompt_logprobs=prompt_logprobs, grammar=grammar, cache_salt=self.cache_salt,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            allowed_token_ids=list(self.allowed_token_ids) if self.allowed_token_ids else None,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens)


class CompletionRequest(SamplingFields):
    """POST /v1/completions. prompt: text, texts, token ids, or lists of token ids (each prompt gets n choices;
    at most --max-prompts prompts)."""

    prompt: (Annotated[str, StringConstraints(min_length=1)]
             | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS_HARD)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS_HARD)])
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _no_suffix(self):
        if self.suffix:
            raise refuse(self, "suffix", "suffix (insertion) is not supported; omit it")
        if self.max_tokens == 0 and not self.echo and self.prompt_logprobs is None:
            raise refuse(self, "max_tokens", ZERO_TOKENS + "echo or prompt_logprobs")
        return self

    @property
    def prompt_logprobs_k(self) -> int | None:
        """Prompt logprobs to compute: vLLM's prompt_logprobs, or the echoed prompt's with echo + logprobs."""
        ks = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(ks) if ks else None


class ContentPart(Strict):
    type: Annotated[str, StringConstraints(max_length=64)]
    text: str | None = None
    image_url: Any = None  # refused by the route with a clear message (text only)


class ChatMessage(Strict):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: str | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: Annotated[str, StringConstraints(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, StringConstraints(max_length=256)] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions; the prompt is the tokenizer's chat template applied to `messages` (and
    `tools`, for templates that take them)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=0, le=BIG)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self):
        asked = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if asked == 0 and self.prompt_logprobs is None:
            field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            raise refuse(self, field, ZERO_TOKENS.replace("max_tokens", field) + "prompt_logprobs")
        if self.top_logprobs and not self.logprobs:
            raise refuse(self, "top_logprobs", "top_logprobs needs logprobs: true")
        if self.add_generation_prompt and self.continue_final_message:
            raise refuse(self, "continue_final_message", "continue_final_message and add_generation_prompt "
                         "cannot both be true")
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and self.tools and (self.response_format or self.structured_outputs):
            raise refuse(self, "tool_choice", "a required or named tool_choice already constrains the output; "
                         "drop response_format / structured_outputs")
        return self


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ModelCard(BaseModel):
    """One entry of GET /v1/models (vLLM's shape: adapters have parent = the base model)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "swapserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[dict[str, Any]] = Field(default_factory=list)
    version: str | None = None  # an adapter's current content version (None for the base model, or before its load)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TGIGrammar(Strict):
    """TGI's `parameters.grammar`: {"type": "json", "value": schema} or {"type": "regex", "value": str}."""

    type: Literal["json", "regex"]
    value: dict[str, Any] | Annotated[str, StringConstraints(min_length=1, max_length=64 * 1024)]

    def spec(self) -> GrammarSpec:
        if self.type == "json":
            return GrammarSpec.json_schema(self.value, "parameters.grammar")
        return GrammarSpec("regex", str(self.value), "parameters.grammar")


class TGIParameters(Strict):
    """TGI's `parameters`; sampling is on when do_sample is true or any of temperature/top_k/top_p is set.
    decoder_input_details (with details, not streamed) fills details.prefill from the prompt's logprobs."""

    adapter_id: Name | None = None
    adapters: Adapters | None = None  # as on /v1/completions; then adapter_id is the base model or omitted
    best_of: int | None = Field(None, ge=1, le=1)
    details: bool = False
    decoder_input_details: bool = False
    do_sample: bool = False
    max_new_tokens: int | None = Field(100, ge=1, le=BIG)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=I64)
    stop: Annotated[list[StopStr], Field(max_length=16)] = Field(default_factory=list)
    temperature: float | None = Field(None, gt=0.0, le=100.0)
    top_k: int | None = Field(None, gt=0, le=BIG)
    top_p: float | None = Field(None, gt=0.0, lt=1.0)
    truncate: int | None = Field(None, ge=1, le=BIG)
    typical_p: float | None = Field(None, gt=0.0, lt=1.0)
    top_n_tokens: int | None = Field(None, ge=0, le=5)
    grammar: TGIGrammar | None = None
    watermark: bool = False

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        if self.typical_p is not None:
            raise refuse(self, "typical_p", "typical_p sampling is not supported; omit it")
        if self.watermark:
            raise refuse(self, "watermark", "watermarking is not supported; omit it")
        return self

    @model_validator(mode="after")
    def _draw_seed(self):
        if self.seed is None and self.sampling:  # TGI draws the seed it samples with and reports it in details
            self.seed = random.getrandbits(63)
        return self

    @property
    def sampling(self) -> bool:
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    def sampling_params(self, logprobs: bool, grammar=None) -> SamplingParams:
        sample = self.sampling
        return SamplingParams(
            max_tokens=self.max_new_tokens or 100,
            temperature=(self.temperature or 1.0) if sample else 0.0,
            top_p=self.top_p or 1.0, top_k=self.top_k or -1,
            repetition_penalty=self.repetition_penalty or 1.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=[s for s in self.stop if s], include_stop_str_in_output=True,  # TGI keeps it
            logprobs=logprobs, top_logprobs=(self.top_n_tokens or 0) if logprobs else 0,
            prompt_logprobs=0 if self.details and self.decoder_input_details else None, grammar=grammar)


class TGIRequest(Strict):
    """POST /generate and /generate_stream."""

    inputs: Annotated[str, StringConstraints(min_length=1)]
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False

    @model_validator(mode="after")
    def _no_streamed_prefill(self):
        if self.stream and self.parameters.decoder_input_details:
            raise refuse(self, "decoder_input_details", "decoder_input_details is not supported when streaming")
        return self


class LoadLoRARequest(Strict):
    """vLLM's POST /v1/load_lora_adapter; both fields are checked by the route to give vLLM's message."""

    lora_name: Annotated[str, StringConstraints(max_length=256)] | None = None
    lora_path: Annotated[str, StringConstraints(max_length=4096)] | None = None
    load_inplace: bool = False


class UnloadLoRARequest(Strict):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: Annotated[str, StringConstraints(max_length=256)] | None = None
    lora_int_id: int | None = Field(None, ge=0, le=2**31 - 1)


class AdapterCreate(Strict):
    """POST /v1/adapters: `source` is a directory under an --adapter-root or an allowed Hub id[@revision]."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    pinned: bool = False
    replace: bool = False


class AdapterPut(Strict):
    """PUT /v1/adapters/{name}: load ``source`` under the name, creating it or, when it exists, reloading it (a new
    version when the content differs; the older ones stay addressable as name@version)."""

    source: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    pinned: bool = False


class RollbackRequest(Strict):
    """POST /v1/adapters/{name}/rollback: point the name back at one of its loaded versions."""

    version: Annotated[str, StringConstraints(min_length=1, max_length=64)]


class TrafficRequest(Strict):
    """PUT /v1/adapters/{name}/traffic: {version: weight}, weights summing to 100 (checked by the engine)."""

    split: Annotated[dict[Annotated[str, StringConstraints(max_length=64)], object], Field(max_length=64)]
