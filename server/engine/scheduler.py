"""Scheduler: who runs this step. Iteration-level: requests join and leave the running batch between steps.

Rules, in order: running requests always decode; waiting requests are admitted FCFS while a KV row is free,
the prefill token budget allows, and the step would hold at most ``max_loras`` distinct adapters. A request
whose adapter is still loading, or has no slot, is passed over (others behind it may go); once it has been
passed over ``starvation_steps`` times, nothing behind it is admitted until it runs.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from server.engine.request import Request, RequestStatus
from server.errors import QueueFullError


@dataclass
class ScheduledBatch:
    decode: list[Request]  # rows 0..len-1, all running before this step
    prefill: list[Request]  # admitted now; they take rows len(decode).. in this order


class Scheduler:
    def __init__(self, max_num_seqs: int, max_loras: int, max_num_batched_tokens: int, max_waiting: int,
                 starvation_steps: int = 32):
        self.max_num_seqs = max_num_seqs
        self.max_loras = max_loras
        self.token_budget = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.starvation_steps = starvation_steps
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # index == KV row

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry shortly")
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, adapter_ready: Callable[[Request], bool]) -> ScheduledBatch:
        decode = list(self.running)
        active = {r.adapter_key for r in decode if r.adapter_key is not None}
        admitted: list[Request] = []
        budget = self.token_budget
        for req in list(self.waiting):
            if len(decode) + len(admitted) >= self.max_num_seqs:
                break
            if not adapter_ready(req):
                continue
            key = req.adapter_key
            if key is not None and key not in active and len(active) >= self.max_loras:
                req.skipped += 1
                if req.skipped >= self.starvation_steps:
                    break  # let the running adapters drain so this one gets a slot
                continue
            cost = len(req.prompt_token_ids)
            if admitted and cost > budget:
                break
            budget -= cost
            admitted.append(req)
            if key is not None:
                active.add(key)
        for req in admitted:
            self.waiting.remove(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        return ScheduledBatch(decode, admitted)

    def remove_waiting(self, req: Request) -> None:
        self.waiting.remove(req)
        req.status = RequestStatus.FINISHED

    def finish_rows(self, rows: list[int], move_row: Callable[[int, int, int], None]) -> None:
        """Free finished rows, keeping running rows dense by moving the last row into each hole."""
        for i in sorted(rows, reverse=True):
            last = len(self.running) - 1
            self.running[i].status = RequestStatus.FINISHED
            if i != last:
                moved = self.running[last]
                move_row(last, i, moved.num_tokens - 1)
                self.running[i] = moved
            self.running.pop()
