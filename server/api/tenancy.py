"""Tenancy (app.state.tenancy): who sent a request (--api-key, a tenant of --api-keys-file, or open), and the
bookkeeping that follows a tenant's request through the engine.

Keys: the unrestricted --api-key and the tenants' keys both open inference routes; neither opens admin routes
(--admin-key does). With neither set, inference routes are open. Both may be given: --api-key is then one more
key that reaches everything without limits (an operator's or a trusted service's).

A tenant's request is admitted (TenantLimits) once its prompts are tokenized, just before its engine requests are
added; as an engine observer this object sees each of those engine requests finish and, after the last, settles
the request's tokens and frees its concurrency slot. It also tells the request log which tenant a row belongs
to, so the log names the tenant, never a key.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from server.api.auth import key_matches
from server.api.errors import AuthError
from server.api.generation import row_id
from server.api.settings import ServerConfig
from server.api.tenant_keys import Tenant
from server.api.tenant_limits import TenantLimits, Ticket
from server.api.tenants import TenantKeys, authorize


@dataclass
class _Open:
    """One admitted request's engine rows still running, and the tokens of those that finished."""

    ticket: Ticket
    remaining: int
    prompt_rows: set[str] = field(default_factory=set)  # the rows whose prompt usage counts (one per prompt)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    meter: object = None  # also told the tokens when the request ends (deploy/ray's relay reports them)


class Tenancy:
    def __init__(self, config: ServerConfig, registry=None) -> None:
        self.api_key = config.api_key
        self.keys = (TenantKeys(config.api_keys_file, {"--api-key": config.api_key, "--admin-key": config.admin_key})
                     if config.api_keys_file else None)
        self.limits = TenantLimits(registry)
        self._lock = threading.Lock()
        self._rows: dict[str, _Open] = {}  # engine request id -> its request's bookkeeping

    @property
    def required(self) -> bool:
        return self.api_key is not None or self.keys is not None

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant ``token`` belongs to; None for the unrestricted --api-key, or when no key is required;
        AuthError (401) for anything else. Both comparisons always run (constant time either way)."""
        if not self.required:
            return None
        unrestricted = self.api_key is not None and key_matches(token, self.api_key)
        tenant = self.keys.lookup(token) if self.keys is not None else None
        if unrestricted:
            return None
        if tenant is None:
            raise AuthError("missing or invalid API key (send 'Authorization: Bearer <key>')")
        return tenant

    def authorize(self, tenant: Tenant | None, adapters: list[str], base_model_name: str) -> None:
        """tenants.authorize, with a refusal counted against the tenant."""
        try:
            authorize(tenant, adapters, base_model_name)
        except Exception:
            if tenant is not None:
                self.limits.reject(tenant, "forbidden")
            raise

    def admit(self, tenant: Tenant, jobs: list[tuple[list[int], object]], request_id: str,
              meter=None) -> Ticket:
        """Admit a request whose engine rows will be row_id(request_id, 0), ... (Generation.start's), one per job; its reservation is each distinct prompt once (the n choices of a prompt share its list object, as
        Call.start builds them) plus every row's max_tokens. ``meter``: gets meter.add(prompt, completion) when
        the request ends."""
        rows = [row_id(request_id, i) for i in range(len(jobs))]
        seen, prompt_rows, reserve = set(), set(), 0
        for row, (prompt, params) in zip(rows, jobs):
            if id(prompt) not in seen:
                seen.add(id(prompt))
                prompt_rows.add(row)
                reserve += len(prompt)
            reserve += params.max_tokens
        ticket = self.limits.admit(tenant, reserve)
        with self._lock:
            state = _Open(ticket, len(rows), prompt_rows, meter=meter)
            self._rows.update({row: state for row in rows})
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request was refused before it ran: forget its rows, charge nothing."""
        with self._lock:
            for row in [r for r, state in self._rows.items() if state.ticket is ticket]:
                del self._rows[row]
        ticket.cancel()

    def tenant_of(self, request_id: str) -> str | None:
        """The tenant name of an engine request still running (for the request log)."""
        state = self._rows.get(request_id)
        return state.ticket.tenant.name if state is not None else None

    # --- engine observer (step thread) --------------------------------------------------------------------
    def on_request_finished(self, req) -> None:
        with self._lock:
            state = self._rows.pop(req.request_id, None)
            if state is None:
                return
            if req.request_id in state.prompt_rows:
                state.prompt_tokens += len(req.prompt_token_ids)
            state.completion_tokens += len(req.output_token_ids)
            state.remaining -= 1
            done = state.remaining == 0
        if done:
            state.ticket.finish(state.prompt_tokens, state.completion_tokens)
            if state.meter is not None:
                state.meter.add(state.prompt_tokens, state.completion_tokens)
