"""Request: one generation carried through every stage (queue -> prefill -> decode -> finished)."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a smaller temperature is greedy (dividing by it overflows to inf)


@dataclass
class SamplingParams:
    """Per-request sampling; vLLM's names and meanings. temperature below GREEDY_BELOW (0 among them) = greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 / 0 = off
    min_p: float = 0.0  # vLLM's: after temperature, drop tokens less likely than min_p x the most likely one
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
    include_stop_str_in_output: bool = False  # vLLM's: keep the stop string (or stop token's text) in the output
    skip_special_tokens: bool = True  # vLLM's: special tokens' text is left out of the output
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be generated (greedy included)
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to these tokens' logits before penalties and
    # sampling (greedy included); logprobs stay the raw model's, as vLLM's default
    cache_salt: str | None = None  # vLLM's: hashed into every prefix-cache block of the request, so only requests
    # with the same salt (and adapter content) share KV; the API salts a tenant's requests with its name too

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1


SAMPLING_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


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
    error_status: the HTTP status of that failure: 400, the request cannot be served as asked (its adapter
                  failed to load, or produced non-finite logits); 500, the engine failed (a step raised).
    num_cached_tokens: prompt tokens served from cached prefix blocks (OpenAI's usage.prompt_tokens_details).
    stop_reason: with finish_reason "stop", the stop token id or stop string that ended it (vLLM's); None
                 for EOS.
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
    prompt_logprobs: list[tuple[float, list[tuple[int, float]], int] | None] | None = None  # (logprob, top k, rank)
    error_status: int = 400
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class AdapterUse:
    """One adapter a request reads, at a strength: its delta is added ``scale`` times (a mixture has several).

    entry: the store's AdapterEntry, held (in_flight) from admission until the request finishes; its ``key``
    names the device slot.
    """

    name: str
    entry: object
    scale: float = 1.0

    @property
    def key(self):
        return self.entry.key


MAX_SCALE = 100.0  # |scale| of one adapter in a request (and |weight| of a merge source): beyond it a delta
# swamps the base model
LINEAR_KINDS = ("lora", "adalora")  # adapters whose deltas add: y = W x + sum_i scale_i * dW_i x


def mixture_error(uses, kind_of=None) -> str | None:
    """Why ``uses`` cannot be served (None if they can): DoRA and IA3 are not linear in their weights, so they
    are served alone at scale 1 only. ``kind_of(use)``: the adapter's kind (lora, adalora, dora, ia3) or None
    when not known yet; by default the kind its first load recorded."""
    if len(uses) == 1 and uses[0].scale == 1.0:
        return None  # alone at full strength: any kind
    for use in uses:
        kind = kind_of(use.entry) if kind_of is not None else use.entry.info.get("type")
        if kind is not None and kind not in LINEAR_KINDS:
            return (f"adapter {use.name!r} is {kind.upper() if kind == 'ia3' else 'DoRA'}, which is not linear in its "
                    "weights: it can only be used alone at scale 1.0 (mixtures and scales apply to LoRA, rsLoRA "
                    "and AdaLoRA adapters)")
    return None


def mixture_label(uses) -> str | None:
    """How a request's adapters read in logs and stats: the name, or ``a*0.7+b*0.3``; None for the base."""
    if len(uses) == 1 and uses[0].scale == 1.0:
        return uses[0].name
    return "+".join(f"{u.name}*{u.scale:g}" for u in uses) or None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    uses: tuple[AdapterUse, ...] = ()  # the adapters it reads (none: the base model)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    aborted: bool = False
    finished_time: float | None = None
    error: str | None = None  # why it failed (its RequestOutput's error); None for one that finished or was aborted
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
    stop_checked_len: int = 0  # characters of ``text`` no stop string may end in: searched, or from tokens
    # within min_tokens (vLLM: a stop string must end after the first min_tokens tokens' text)
    stop_reason: int | str | None = None  # what stopped it: the stop token id or stop string (None: EOS)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None]  # the first prompt token has no prefix to be predicted from
        if self.params.grammar is not None and self.constraint is None:
            from server.engine.constraint import Constraint

            self.constraint = Constraint(self.params.grammar)

    @property
    def adapter(self) -> str | None:
        """The adapter's name (a mixture's label, see mixture_label); None = the base model."""
        return mixture_label(self.uses)

    @property
    def active_uses(self) -> tuple[AdapterUse, ...]:
        """The uses that change its output: a component at scale 0 is loaded and held, but takes no slot."""
        return tuple(u for u in self.uses if u.scale != 0)

    @property
    def adapter_keys(self) -> list:
        """The device-slot keys of the adapters it reads this step (one per active use)."""
        return [u.key for u in self.active_uses]

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
