"""LLMEngine.step(): schedule -> run -> update, on one flat token batch over the paged KV cache."""
from __future__ import annotations

import logging
import time

import torch

from server.adapters.store import AdapterStore
from server.config import EngineConfig, token_budget
from server.engine.block_manager import BlockManager, prefix_identity
from server.engine.block_pool import BlockPool
from server.engine.constraint import TokenMask
from server.engine.detokenizer import Detokenizer
from server.engine.grammar import GrammarCompiler
from server.engine.request import Request, RequestOutput, mixture_error, sampling_defaults
from server.engine.runner import ModelRunner, StepOutput
from server.engine.sampler import Sampler
from server.engine.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)


class LLMEngine:
    """The synchronous core. Only the step-loop thread calls step(); other threads talk to it through
    AsyncEngine's inbox."""

    def __init__(self, config: EngineConfig, observers: list | None = None):
        self.config = config
        self.observers = observers if observers is not None else []
        self.runner = ModelRunner(config)
        self.tokenizer = self.runner.tokenizer
        self.max_len = self.runner.max_len
        self.eos_token_ids = _eos_ids(self.runner.model, self.tokenizer)
        self.sampling_defaults = (sampling_defaults(getattr(self.runner.model, "generation_config", None))
                                  if config.generation_config == "auto" else {})
        self.store = AdapterStore(config, self.runner.targets, config.model, self.observers,
                                  banks=self.runner.manager.layout, finish=self.runner.prepare_dora,
                                  dtype=self.runner.dtype)
        self.blocks = BlockManager(BlockPool(self.runner.kv.num_blocks, config.enable_prefix_caching),
                                   config.block_size)
        if self.max_len > self.blocks.capacity_tokens:
            given = "" if self.max_len == config.max_model_len else f" (the model's limit; asked {config.max_model_len})"
            raise ValueError(f"--max-model-len {self.max_len}{given} does not fit the KV cache "
                             f"({self.blocks.capacity_tokens} tokens); raise --kv-cache-memory or lower --max-model-len")
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_loras,
                                   token_budget(config, self.runner.device.type), config.max_waiting,
                                   long_prefill_threshold=config.long_prefill_token_threshold)
        mask = TokenMask(config.max_num_seqs, self.runner.vocab_size, config.overlap_token_masks)
        self.sampler = Sampler(self.eos_token_ids, config.seed, mask)
        self.grammar = GrammarCompiler(self.tokenizer, self.runner.vocab_size, self.eos_token_ids)
        self.detokenizer = Detokenizer(self.tokenizer, self.eos_token_ids)
        # the step's outputs so far: a step that raises leaves them here for fail_all (requests it already
        # ended are out of the scheduler, and their final output must still reach their streams)
        self._outputs: list[tuple[Request, RequestOutput]] = []

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, RequestOutput]]:
        outputs = self._outputs = self._reap()
        batch = self.scheduler.schedule(self._adapter_ready)
        if batch.prefix_queries:
            self._emit("on_prefix_cache", batch.prefix_queries, batch.prefix_hits)
        if batch.preempted:
            log.info("KV cache full: preempted %d request(s); they will be recomputed", len(batch.preempted))
            self._emit("on_preempt", len(batch.preempted))
        if batch.seqs:
            self.sampler.prepare([r for r, n in batch.seqs if r.num_computed_tokens + n == r.num_tokens])
            result = self.runner.execute(batch.seqs, self.store.weights)
            self._advance(batch, result)
            self._sample(result, outputs)
        self._outputs = []
        return outputs

    def _advance(self, batch: ScheduledBatch, result: StepOutput) -> None:
        """The step's tokens are computed: count them, offer their full blocks to the prefix cache, take the
        prompt logprobs asked for."""
        for req, n in batch.seqs:
            req.num_computed_tokens += n
            self.blocks.commit(req)
        for req, logits in result.prompt:
            req.prompt_logprobs += prompt_logprobs(logits, req.prompt_token_ids[len(req.prompt_logprobs):],
                                                   req.params.prompt_logprobs)

    def _sample(self, result: StepOutput, outs: list) -> None:
        """A token for every request that reached its end (none for max_tokens 0, done with its prompt),
        appended to ``outs`` as each is made."""
        keep = [i for i, r in enumerate(result.sampled) if r.params.max_tokens > 0]
        for r in result.sampled:
            if r.params.max_tokens == 0:
                outs.append(self._prompt_only(r))
        sampled = [result.sampled[i] for i in keep]
        logits = result.logits if len(keep) == len(result.sampled) else result.logits[keep]  # no copy if all
        tokens, logprobs, tops = self.sampler(logits, sampled)
        now = time.monotonic()
        for req, token, lp, top in zip(sampled, tokens, logprobs, tops):
            outs.append(self._accept(req, token, lp, top, now))

    def _accept(self, req: Request, token: int | None, lp: float | None, top: list | None,
                now: float) -> tuple[Request, RequestOutput]:
        """Append the sampled ``token`` to ``req`` (advancing its grammar), and its output increment."""
        if token is None:  # its logits were not finite: its own adapter's doing; no other row is touched
            if req.constraint is not None and req.params.allowed_token_ids:  # or its masks left it no token
                return self._fail(req, "no token is left to generate: none of allowed_token_ids is one the "
                                       "request's grammar accepts here (or its adapter's logits are not finite)")
            return self._fail(req, "the model produced non-finite logits for this request (its adapter's weights "
                                   "overflow in this dtype?)")
        if req.constraint is not None and not req.constraint.accept(token):
            return self._fail(req, f"token {token} is outside the request's grammar (please report this)", 500)
        req.output_token_ids.append(token)
        if lp is not None:
            req.output_logprobs.append(lp)
        req.first_token_time = req.first_token_time or now
        req.last_token_time = now
        req.finish_reason = req.finish_reason or self.detokenizer.finish_reason(req, token, self.max_len)
        if req.finish_reason is None and req.constraint is not None and req.constraint.done:
            req.finish_reason = "stop"  # its grammar is complete (ignore_eos kept going past the stop token)
        text = self.detokenizer.delta(req)
        self._emit("on_token", req, now)
        out = self._output(req, [token], text, None if lp is None else [lp], top=None if top is None else [top])
        if req.finish_reason is not None:
            self._finished(req)
        return req, out

    def _output(self, req: Request, tokens: list[int], text: str, logprobs, error: str | None = None,
                top: list | None = None):
        prompt, req.prompt_logprobs_sent = (None if req.prompt_logprobs_sent else req.prompt_logprobs), True
        return RequestOutput(req.request_id, tokens, text, logprobs, req.finish_reason,
                             len(req.prompt_token_ids), len(req.output_token_ids), error, top,
                             req.num_cached_tokens, prompt, stop_reason=req.stop_reason)

    def _prompt_only(self, req: Request) -> tuple[Request, RequestOutput]:
        """max_tokens 0 (echo the prompt, with its logprobs): done once the prompt is computed."""
        req.finish_reason = "length"
        req.first_token_time = req.last_token_time = time.monotonic()
        self._finished(req)
        return req, self._output(req, [], "", None)

    def _fail(self, req: Request, error: str | None, status: int = 400) -> tuple[Request, RequestOutput]:
        req.finish_reason, req.error = "abort", error
        self._finished(req)
        out = self._output(req, [], "", None, error)
        out.error_status = status
        return req, out

    # ---- adapters ---------------------------------------------------------------------------------------
    def _adapter_ready(self, req: Request) -> bool:
        """Every adapter ``req`` reads is in host memory (loads started for those that are not)."""
        waiting = [u.entry for u in req.uses if u.entry.weights is None]
        for entry in waiting:
            fut = entry.future
            if fut is None or (fut.done() and not _load_failed(fut)):  # evicted from host meanwhile: load again
                self.store.ensure_host(entry)
        if waiting:
            return False
        for use in req.active_uses:  # a pinned name's current version only (name@older is never pinned again)
            if use.entry.pinned and self.store.entries.get(use.entry.name) is use.entry:
                self.runner.manager.pin(use.key)
        req.prefix_identity = prefix_identity(req.active_uses, req.params.cache_salt)
        return True

    def _reap(self) -> list[tuple[Request, RequestOutput]]:
        """Aborted requests leave (their blocks are freed now); waiting requests with an adapter whose load
        failed, or that a mixture may not hold, finish with the reason."""
        outs = [self._fail(r, None) for r in list(self.scheduler.running) if r.aborted]
        for req in list(self.scheduler.waiting):
            error = None if req.aborted else _refusal(req)
            if req.aborted or error:
                outs.append(self._fail(req, error))
        return outs

    def fail_all(self, error: str) -> list[tuple[Request, RequestOutput]]:
        """End every request after a failed step (an internal error: HTTP 500 with ``error``, never a quiet
        "abort" that reads as a finished answer): nothing is left half-run. The outputs the failed step had
        made come first: some ended their requests (an abort, a failed load, a last token) before it failed."""
        made, self._outputs = self._outputs, []
        return made + [self._fail(r, error, 500) for r in list(self.scheduler.running) + list(self.scheduler.waiting)]

    def drop_device(self, key) -> None:
        """Free the device slot of version ``key`` (no name or request holds it any more)."""
        if self.runner.manager.resident(key):
            self.runner.manager.evict(key)
        self.unpin_device(key)

    def unpin_device(self, key) -> None:
        """Version ``key`` is no longer the current version of a pinned name: its slot may be evicted again."""
        self.runner.manager.pinned.discard(key)

    def _finished(self, req: Request) -> None:
        req.finished_time = time.monotonic()
        self.scheduler.finish(req)
        self.sampler.forget(req.request_id)
        for use in req.uses:
            freed = self.store.release(use.entry)
            if freed is not None:
                self.drop_device(freed)
        self._emit("on_request_finished", req)

    def stats(self) -> dict:
        """The step thread's state, read racily by other threads (counts only)."""
        sched, pool = self.scheduler, self.blocks.pool
        return {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "kv_cache_usage": pool.usage, "kv_blocks_total": pool.num_blocks - 1,
                "device_hits": self.runner.manager.hits, "device_loads": self.runner.manager.loads,
                "device_evictions": self.runner.manager.evictions, "host_loads": self.store.loads,
                "host_evictions": self.store.evictions,
                "kv_blocks_free": pool.num_free, "kv_cache_bytes": self.runner.kv.nbytes,
                "block_size": self.blocks.block_size}

    def _emit(self, method: str, *args) -> None:
        """Tell the observers (metrics, tenancy, the request log): one that raises is logged and passed over,
        never the step's failure (fail_all emits too: a raising observer there ended the step thread)."""
        for obs in self.observers:
            fn = getattr(obs, method, None)
            if fn:
                try:
                    fn(*args)
                except Exception:
                    log.exception("observer %s.%s failed", type(obs).__name__, method)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[tuple[float, list, int]]:
    """logits: [m, vocab], row i predicting ``targets[i]``. Per row: the target's logprob, the k most likely
    tokens as [(token_id, logprob)] (raw model distribution, as the sampled tokens' logprobs) and the target's
    1-based rank (vLLM's: how many tokens are at least as likely)."""
    logp = torch.log_softmax(logits, -1)  # [m, vocab]
    chosen_t = logp.gather(1, torch.tensor(targets[:len(logp)], device=logp.device)[:, None])  # [m, 1]
    ranks = (logp >= chosen_t).sum(-1).tolist()
    chosen = chosen_t[:, 0].tolist()
    if not k:
        return [(lp, [], r) for lp, r in zip(chosen, ranks)]
    values, ids = torch.topk(logp, k)
    return [(lp, list(zip(i, v)), r) for lp, i, v, r in zip(chosen, ids.tolist(), values.tolist(), ranks)]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _refusal(req: Request) -> str | None:
    """Why a waiting request cannot run: an adapter that failed to load, or one a mixture may not hold."""
    for use in req.uses:
        fut = use.entry.future
        if fut is not None and fut.done() and _load_failed(fut):
            return f"adapter {use.name!r} failed to load: {use.entry.error}"
    return mixture_error(req.uses)


def _load_failed(fut) -> bool:
    """A finished host load that produced no weights: it raised, or was cancelled (the store shut down)."""
    return fut.cancelled() or fut.exception() is not None
