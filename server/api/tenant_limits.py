"""TenantLimits: each tenant's rpm, tpm and max_concurrent, over sliding one-minute windows, and its counters.

How a request is charged:
  rpm             every request admitted here counts, at admission (one HTTP request = 1, whatever its n or
                  number of prompts), also one the engine then refuses (unknown adapter, full queue).
  max_concurrent  HTTP requests admitted and not yet finished (one with n = 4 counts once).
  tpm             at admission a request reserves the most it can use: its prompt tokens (once per prompt, as
                  `usage` counts them) plus max_tokens for every choice; it is refused unless the reservation
                  fits beside the tokens charged in the last 60 s. When it finishes, the charge becomes what it
                  used (usage.total_tokens: prompt + completion), so unused max_tokens return to the budget; a
                  refused request is charged nothing. A charge stays in the window for 60 s from admission.
                  A request that reserves more than the whole tpm can never pass: 400 (lower max_tokens), not 429.
Over a limit: 429 rate_limit_error with Retry-After = whole seconds until the oldest request (rpm) or enough
tokens (tpm) leave the window; 1 for max_concurrent (a running request ends at no predictable time).
Limits are read from the tenant as currently loaded, so a reload that changes them applies at once; the windows
are kept by tenant name across reloads.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter

from server.api.tenant_keys import Tenant
from server.errors import InvalidRequestError, SwapserveError

WINDOW = 60.0


class RateLimitedError(SwapserveError):
    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Charge:
    at: float
    tokens: int


@dataclass
class _Window:
    """One tenant's state: admission times (rpm), token charges (tpm), requests in flight."""

    requests: deque = field(default_factory=deque)  # [admission time]
    charges: deque = field(default_factory=deque)  # [_Charge]
    in_flight: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW:
            self.requests.popleft()
        while self.charges and self.charges[0].at <= now - WINDOW:
            self.charges.popleft()

    def tokens(self) -> int:
        return sum(c.tokens for c in self.charges)

    def tokens_free_after(self, need: int, limit: int, now: float) -> float:
        """Seconds until ``need`` more tokens fit under ``limit`` as charges leave the window."""
        used = self.tokens()
        for charge in self.charges:
            used -= charge.tokens
            if used + need <= limit:
                return charge.at + WINDOW - now
        return WINDOW


class Ticket:
    """One admitted request: `finish(prompt, completion)` settles its tokens and frees its concurrency slot;
    `cancel()` (refused before it ran) charges nothing. Either, once; later calls do nothing."""

    def __init__(self, limits: TenantLimits, tenant: Tenant, charge: _Charge) -> None:
        self.limits, self.tenant, self.charge = limits, tenant, charge
        self.done = False

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.limits._settle(self, prompt_tokens, completion_tokens)

    def cancel(self) -> None:
        self.limits._settle(self, 0, 0, counted=False)


class TenantLimits:
    def __init__(self, registry: CollectorRegistry | None = None, clock=time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()  # admission runs on the event loop, settlement may run on the step thread
        self._windows: dict[str, _Window] = {}
        reg = registry or CollectorRegistry()
        self.requests = Counter("swapserve:tenant_requests", "Requests admitted per tenant.", ["tenant"],
                                registry=reg)
        self.prompt_tokens = Counter("swapserve:tenant_prompt_tokens", "Prompt tokens of finished requests per "
                                     "tenant (once per prompt, as usage counts them).", ["tenant"], registry=reg)
        self.generation_tokens = Counter("swapserve:tenant_generation_tokens", "Generated tokens of finished "
                                         "requests per tenant.", ["tenant"], registry=reg)
        self.rejected = Counter("swapserve:tenant_rejected_requests", "Requests refused per tenant and reason "
                                "(forbidden, rpm, tpm, max_concurrent).", ["tenant", "reason"], registry=reg)

    def admit(self, tenant: Tenant, reserve_tokens: int) -> Ticket:
        """Admit one request of ``tenant`` that may use up to ``reserve_tokens``, or raise 429 (400 when it could
        never fit under the tenant's tpm)."""
        if tenant.tpm is not None and reserve_tokens > tenant.tpm:
            self.rejected.labels(tenant.name, "tpm").inc()
            raise InvalidRequestError(f"this request may use up to {reserve_tokens} tokens (prompt + max_tokens "
                                      f"for every choice), more than this API key's tpm ({tenant.tpm}) allows "
                                      "in a minute; lower max_tokens", "max_tokens")
        with self._lock:
            now = self.clock()
            window = self._windows.setdefault(tenant.name, _Window())
            window.expire(now)
            refusal = self._refusal(tenant, window, reserve_tokens, now)
            if refusal is None:
                window.requests.append(now)
                window.in_flight += 1
                charge = _Charge(now, reserve_tokens)
                window.charges.append(charge)
        if refusal is not None:
            reason, message, wait = refusal
            self.rejected.labels(tenant.name, reason).inc()
            raise RateLimitedError(message, max(1, math.ceil(wait)))
        self.requests.labels(tenant.name).inc()
        return Ticket(self, tenant, charge)

    @staticmethod
    def _refusal(tenant: Tenant, window: _Window, need: int, now: float) -> tuple[str, str, float] | None:
        who = f"this API key ({tenant.name})"
        if tenant.max_concurrent is not None and window.in_flight >= tenant.max_concurrent:
            return ("max_concurrent", f"{who} has {window.in_flight} requests in flight; its max_concurrent is "
                    f"{tenant.max_concurrent}", 1.0)
        if tenant.rpm is not None and len(window.requests) >= tenant.rpm:
            return ("rpm", f"{who} made {len(window.requests)} requests in the last minute; its rpm is {tenant.rpm}",
                    window.requests[0] + WINDOW - now)
        if tenant.tpm is not None and window.tokens() + need > tenant.tpm:
            return ("tpm", f"{who} used or reserved {window.tokens()} tokens in the last minute and this request may "
                    f"use up to {need}; its tpm is {tenant.tpm}", window.tokens_free_after(need, tenant.tpm, now))
        return None

    def reject(self, tenant: Tenant, reason: str) -> None:
        """Count a refusal decided elsewhere (a 403 for an adapter the key may not use)."""
        self.rejected.labels(tenant.name, reason).inc()

    def in_flight(self, name: str) -> int:
        window = self._windows.get(name)
        return window.in_flight if window else 0

    def _settle(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int, counted: bool = True) -> None:
        with self._lock:
            if ticket.done:
                return
            ticket.done = True
            ticket.charge.tokens = prompt_tokens + completion_tokens
            window = self._windows.get(ticket.tenant.name)
            if window is not None:
                window.in_flight -= 1
        if counted:
            self.prompt_tokens.labels(ticket.tenant.name).inc(prompt_tokens)
            self.generation_tokens.labels(ticket.tenant.name).inc(completion_tokens)
