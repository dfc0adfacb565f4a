"""LLMEngine.step() (schedule -> activate adapters -> execute -> update) and AsyncEngine, which runs it on a
background thread and feeds per-request asyncio queues."""
from __future__ import annotations

import logging
import time

import torch

from server.adapters.store import AdapterStore
from server.config import EngineConfig
from server.engine.detokenizer import Detokenizer
from server.engine.request import Request, RequestOutput
from server.engine.runner import ModelRunner
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler

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
        self.store = AdapterStore(config, self.runner.targets, config.model, self.observers,
                                  banks=self.runner.manager.layout, finish=self.runner.prepare_dora)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_loras, config.max_num_batched_tokens,
                                   config.max_waiting)
        self.sampler = Sampler(self.eos_token_ids, config.seed)
        self.detokenizer = Detokenizer(self.tokenizer, self.eos_token_ids)

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, RequestOutput]]:
        outputs = self._reap()
        batch = self.scheduler.schedule(self._adapter_ready)
        self._pin(batch.decode + batch.prefill)
        self.runner.manager.reserve([r.adapter_key for r in batch.decode + batch.prefill], self.store.weights)
        if batch.decode:
            logits = self.runner.decode([r.output_token_ids[-1] for r in batch.decode],
                                        [r.num_tokens - 1 for r in batch.decode],
                                        [r.adapter_key for r in batch.decode], self.store.weights)
            outputs += self._update(batch.decode, logits)
        if batch.prefill:
            now = time.monotonic()
            for r in batch.prefill:
                r.first_scheduled_time = now
            logits = self.runner.prefill(len(batch.decode), [r.prompt_token_ids for r in batch.prefill],
                                         [r.adapter_key for r in batch.prefill], self.store.weights)
            outputs += self._update(batch.prefill, logits)
        done = [i for i, r in enumerate(self.scheduler.running) if r.finish_reason is not None]
        self.scheduler.finish_rows(done, self.runner.kv.move_row)
        return outputs

    def _update(self, reqs: list[Request], logits: torch.Tensor) -> list[tuple[Request, RequestOutput]]:
        tokens, logprobs, tops = self.sampler(logits, reqs)
        now = time.monotonic()
        outs = []
        for req, token, lp, top in zip(reqs, tokens, logprobs, tops):
            req.output_token_ids.append(token)
            if lp is not None:
                req.output_logprobs.append(lp)
            req.first_token_time = req.first_token_time or now
            req.last_token_time = now
            req.finish_reason = req.finish_reason or self.detokenizer.finish_reason(req, token, self.max_len)
            text = self.detokenizer.delta(req)
            self._emit("on_token", req, now)
            outs.append((req, self._output(req, [token], text, None if lp is None else [lp],
                                           top=None if top is None else [top])))
            if req.finish_reason is not None:
                self._finished(req)
        return outs

    def _output(self, req: Request, tokens: list[int], text: str, logprobs, error: str | None = None,
                top: list | None = None):
        return RequestOutput(req.request_id, tokens, text, logprobs, req.finish_reason,
                             len(req.prompt_token_ids), len(req.output_token_ids), error, top)

    # ---- adapters ---------------------------------------------------------------------------------------
    def _adapter_ready(self, req: Request) -> bool:
        entry = req.adapter_entry
        if entry is None or entry.weights is not None:
            return True
        fut = entry.future
        if fut is None or (fut.done() and not _load_failed(fut)):  # evicted from host meanwhile: load again
            self.store.ensure_host(entry)
        return False

    def _pin(self, reqs: list[Request]) -> None:
        for r in reqs:
            if r.adapter_entry is not None and r.adapter_entry.pinned:
                self.runner.manager.pinned.add(r.adapter_key)

    def _reap(self) -> list[tuple[Request, RequestOutput]]:
        """Aborted requests leave (their rows are freed now); waiting requests whose adapter load failed
        finish with the load error."""
        outs = []
        aborted = [i for i, r in enumerate(self.scheduler.running) if r.aborted]
        for i in aborted:
            req = self.scheduler.running[i]
            req.finish_reason = "abort"
            self._finished(req)
            outs.append((req, self._output(req, [], "", None)))
        self.scheduler.finish_rows(aborted, self.runner.kv.move_row)
        for req in list(self.scheduler.waiting):
            fut = getattr(req.adapter_entry, "future", None)
            if req.aborted or (fut is not None and fut.done() and _load_failed(fut)):
                self.scheduler.remove_waiting(req)
                req.finish_reason = "abort"
                error = None if req.aborted else f"adapter {req.adapter!r} failed to load: {req.adapter_entry.error}"
                self._finished(req)
                outs.append((req, self._output(req, [], "", None, error)))
        return outs

    def drop_device(self, key) -> None:
        if self.runner.manager.resident(key):
            self.runner.manager.evict(key)
        self.runner.manager.pinned.discard(key)

    def _finished(self, req: Request) -> None:
        self.sampler.forget(req.request_id)
        if req.adapter_key is not None and self.store.release(req.adapter_key):
            self.drop_device(req.adapter_key)
        self._emit("on_request_finished", req)

    def _emit(self, method: str, *args) -> None:
        for obs in self.observers:
            fn = getattr(obs, method, None)
            if fn:
                fn(*args)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def _load_failed(fut) -> bool:
    """A finished host load that produced no weights: it raised, or was cancelled (the store shut down)."""
    return fut.cancelled() or fut.exception() is not None


from server.engine.async_engine import AsyncEngine, RequestStream  # noqa: E402  (the public entry point)
