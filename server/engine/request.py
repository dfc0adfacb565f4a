"""Request: one generation carried through every stage (queue -> prefill -> decode -> finished)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request sampling; vLLM's names and meanings. temperature 0 = greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 / 0 = off
    repetition_penalty: float = 1.0  # HF: divides positive / multiplies negative logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often a token was generated
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False  # the chosen token's logprob (raw model distribution, before penalties/temperature)
    top_logprobs: int = 0  # also the n most likely tokens' (with ``logprobs``)
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob given its prefix, and the k most
    # likely tokens' (k = 0: the token's own only); None = off. Such a prompt is always computed, never read
    # from the prefix cache (cached blocks carry no logits)
    grammar: object = None  # a compiled grammar (engine.grammar.GrammarCompiler.compile): the output must match
    # it; each request built from these params gets its own matcher (Request.constraint)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


def sampling_defaults(generation_config) -> dict:
    """vLLM's --generation-config auto: the sampling values a model's generation_config.json sets (those that
    differ from transformers' defaults), used for the fields a request leaves out."""
    if generation_config is None:
        return {}
    given = generation_config.to_diff_dict()
    return {k: given[k] for k in SAMPLING_DEFAULT_FIELDS if given.get(k) is not None}


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed); its adapter may still be loading
    RUNNING = "running"  # holds KV blocks; prefilling (possibly in chunks) or decoding
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One increment of a request's output, put on its queue each step it advances.

    token_ids / text / logprobs: the new tokens of this increment (text never splits a UTF-8 character).
    top_logprobs: per new token, the [(token_id, logprob)] of the ``top_logprobs`` most likely tokens.
    finish_reason: None while running; "stop" (EOS, stop string or stop token), "length" or "abort".
    error: set when the request failed (e.g. its adapter could not be loaded); then finish_reason is "abort".
    num_cached_tokens: prompt tokens served from cached prefix blocks (OpenAI's usage.prompt_tokens_details).
    prompt_logprobs: with params.prompt_logprobs, on the first increment only: per prompt token, None for the
                     first, else (its logprob, [(token_id, logprob)] of the k most likely) given its prefix.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # the user's adapter name; None = base model
    adapter_version: int = 0  # which load of ``adapter`` this request was admitted against
    adapter_entry: object = None  # the store's AdapterEntry it holds (in_flight) until it finishes
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    aborted: bool = False
    # KV state (BlockManager): tokens [0, num_computed_tokens) have their KV in ``block_ids``
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, served from cached prefix blocks at (re)admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # memo of full blocks' content hashes
    num_registered_blocks: int = 0  # leading blocks already entered in the prefix cache
    prefix_identity: bytes = b""  # the adapter's content hash (b"" = base model): part of every block hash
    num_preemptions: int = 0
    prompt_logprobs: list | None = None  # built chunk by chunk when params.prompt_logprobs is set (see RequestOutput)
    prompt_logprobs_sent: bool = False  # they go out once, with the first increment
    constraint: object = None  # its Constraint when params.grammar is set: advanced by each accepted token only
    # detokenization state (Detokenizer): text of output tokens [0, read_offset), decoded incrementally
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0

    skipped: int = 0  # steps it was passed over because its adapter had no slot (starvation guard)
    sent_text_len: int = 0  # characters of ``text`` already emitted

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]  # the first prompt token has no prefix to be predicted from
        if self.params.grammar is not None and self.constraint is None:
            from server.engine.constraint import Constraint

            self.constraint = Constraint(self.params.grammar)

    @property
    def adapter_key(self) -> tuple[str, int] | None:
        return None if self.adapter is None else (self.adapter, self.adapter_version)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without building the whole list."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    @property
    def prefilling(self) -> bool:
        """Some of its tokens other than the newest still lack KV (a prompt in chunks, or a recompute)."""
        return self.num_computed_tokens < self.num_tokens - 1
