"""Scheduler: which requests compute how many tokens this step, within a token budget and the KV blocks.

Iteration-level and token-level: requests join and leave between steps, and a step computes exactly the
tokens scheduled (a decode token per running sequence plus prefill chunks), never padding. Rules, in order:

1. Running requests that decode get their one token first (oldest first), so a long prompt arriving never
   delays the running streams by more than the chunk it shares their step with.
2. Running requests still prefilling (a prompt in chunks, or a preempted one being recomputed) get chunks
   from what budget is left: ``min(tokens left, budget)``, and at most ``long_prefill_threshold`` tokens a
   step when that is set (vLLM's --long-prefill-token-threshold), so a long prompt leaves budget for short
   ones to start beside it instead of holding every later arrival until its whole prefill is done.
3. Waiting requests are admitted FCFS while a sequence slot (``max_num_seqs``), budget and KV blocks are free
   (their first chunk capped by ``long_prefill_threshold`` too)
   and the step would hold at most ``max_loras`` distinct adapters (every component of a mixture counts);
   their prompt starts after its longest cached prefix. A request whose adapter is still loading, or has no
   slot, is passed over (others behind it may go); once passed over ``starvation_steps`` times, nothing
   behind it is admitted until it runs.
4. When a running request needs a block and none is free, the newest running request is preempted: its blocks
   are freed and it goes back to the front of the queue, to be recomputed from its tokens later (its output so
   far is kept, and prefix caching usually gives most of it back). Admission never preempts.

The budget counts the tokens computed, so it bounds a step's cost.
"""
from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from server.engine.block_manager import BlockManager
from server.engine.request import Request, RequestStatus
from server.errors import QueueFullError


@dataclass
class ScheduledBatch:
    """seqs: each scheduled request and how many of its tokens this step computes, starting at its
    ``num_computed_tokens``. preempted: requests that lost their blocks this step (now waiting).
    prefix_queries / prefix_hits: tokens of the admitted requests looked up in the prefix cache / found."""

    seqs: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    prefix_queries: int = 0
    prefix_hits: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_loras: int, max_num_batched_tokens: int,
                 max_waiting: int, starvation_steps: int = 32, long_prefill_threshold: int = 0):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.token_budget = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.starvation_steps = starvation_steps
        self.chunk_cap = long_prefill_threshold or max_num_batched_tokens  # the most one request computes a step
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is preempted first

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry shortly")
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, adapter_ready: Callable[[Request], bool]) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.token_budget
        decoding = [r for r in self.running if not r.prefilling]
        prefilling = [r for r in self.running if r.prefilling]
        for req in decoding + prefilling:
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.chunk_cap)
            if self._allocate_or_preempt(req, n, batch):
                batch.seqs.append((req, n))
                budget -= n
        if not batch.preempted:
            self._admit(batch, budget, adapter_ready)
        return batch

    def _allocate_or_preempt(self, req: Request, n: int, batch: ScheduledBatch) -> bool:
        """Blocks for ``n`` more tokens of running ``req``, preempting the newest running requests until they
        fit; False when ``req`` itself had to go."""
        while not self.blocks.allocate(req, n):
            victim = self.running[-1]
            self.preempt(victim)
            batch.preempted.append(victim)
            batch.seqs = [(r, k) for r, k in batch.seqs if r is not victim]  # it may have been scheduled already
            if victim is req:
                return False
        return True

    def _admit(self, batch: ScheduledBatch, budget: int, adapter_ready: Callable[[Request], bool]) -> None:
        active = {k for r in self.running for k in r.adapter_keys}
        for req in list(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            if not adapter_ready(req):
                continue
            new = set(req.adapter_keys) - active
            if new and len(active) + len(new) > self.max_loras:
                req.skipped += 1
                if req.skipped >= self.starvation_steps:
                    break  # let the running adapters drain so this one gets its slots
                continue
            prefix = self.blocks.cached_prefix(req)
            n = min(req.num_tokens - len(prefix) * self.blocks.block_size, budget, self.chunk_cap)
            if not self.blocks.allocate(req, n, prefix):
                break  # FCFS: no KV for the head of the queue now; running requests will free some
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            req.first_scheduled_time = req.first_scheduled_time or time.monotonic()  # queue time ends here
            self.running.append(req)
            batch.seqs.append((req, n))
            if not req.num_preemptions and self.blocks.looks_up(req):  # vLLM's: first admissions that look up
                batch.prefix_queries += req.num_tokens
                batch.prefix_hits += req.num_computed_tokens
            budget -= n
            active |= new

    def preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and queue it first, to be recomputed (prompt and output so far) later."""
        self.running.remove(req)
        self.blocks.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """``req`` is done (finished, aborted or failed): free its blocks, wherever it is."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req)
        req.status = RequestStatus.FINISHED
