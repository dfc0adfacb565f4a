"""Pydantic request and response models of the OpenAI and TGI APIs.

Every numeric field is bounded and every list is capped, so no request can ask for unbounded work; unknown
fields are accepted and ignored (clients send vendor extensions). Sampling fields keep vLLM's names.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from server.api.settings import MAX_N, MAX_PROMPTS
from server.engine.request import SamplingParams

I64 = 2**63 - 1
BIG = 1 << 20  # bound on token counts; the engine enforces --max-model-len on top
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
StopStr = Annotated[str, StringConstraints(max_length=512)]  # "" is accepted and ignored
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=BIG)]
Stop = StopStr | Annotated[list[StopStr], Field(max_length=16)] | None


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(Lenient):
    """Fields shared by /v1/completions and /v1/chat/completions; penalties other than repetition are ignored."""

    model: Name | None = None
    max_tokens: int | None = Field(None, ge=1, le=BIG)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=BIG)
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

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: bool, index: int, top_logprobs: int = 0) -> SamplingParams:
        """Engine parameters for choice `index`: choices of one seeded request get seeds seed, seed+1, ..."""
        stop = [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop or []) if s]
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=-1 if self.top_k is None else self.top_k,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else self.seed + index, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs if logprobs else 0)


class CompletionRequest(SamplingFields):
    """POST /v1/completions. prompt: text, texts, token ids, or lists of token ids (each prompt gets n choices)."""

    prompt: (Annotated[str, StringConstraints(min_length=1)]
             | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


class ContentPart(Lenient):
    type: Annotated[str, StringConstraints(max_length=64)]
    text: str | None = None


class ChatMessage(Lenient):
    role: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    content: str | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: Annotated[str, StringConstraints(max_length=256)] | None = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions; the prompt is the tokenizer's chat template applied to `messages`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_completion_tokens: int | None = Field(None, ge=1, le=BIG)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TGIParameters(Lenient):
    """TGI's `parameters`; sampling is on when do_sample is true or any of temperature/top_k/top_p is set."""

    adapter_id: Name | None = None
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

    def sampling_params(self, logprobs: bool) -> SamplingParams:
        sample = self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))
        return SamplingParams(
            max_tokens=self.max_new_tokens or 100,
            temperature=(self.temperature or 1.0) if sample else 0.0,
            top_p=self.top_p or 1.0, top_k=self.top_k or -1,
            repetition_penalty=self.repetition_penalty or 1.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed, stop=[s for s in self.stop if s],
            logprobs=logprobs, top_logprobs=(self.top_n_tokens or 0) if logprobs else 0)


class TGIRequest(Lenient):
    """POST /generate and /generate_stream."""

    inputs: Annotated[str, StringConstraints(min_length=1)]
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class LoadLoRARequest(Lenient):
    """vLLM's POST /v1/load_lora_adapter; both fields are checked by the route to give vLLM's message."""

    lora_name: Annotated[str, StringConstraints(max_length=256)] | None = None
    lora_path: Annotated[str, StringConstraints(max_length=4096)] | None = None
    load_inplace: bool = False


class UnloadLoRARequest(Lenient):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: Annotated[str, StringConstraints(max_length=256)] | None = None
    lora_int_id: int | None = Field(None, ge=0, le=2**31 - 1)


class AdapterCreate(Lenient):
    """POST /v1/adapters: `source` is a directory under an --adapter-root or an allowed Hub id[@revision]."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    source: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    pinned: bool = False
    replace: bool = False
