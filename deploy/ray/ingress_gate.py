"""IngressGate: tenant keys checked at the Ray Serve ingress, before a request reaches (or loads anything on) an
engine replica.

What it checks, from the body it relays (server.api.tenancy does the same inside each replica):
  every API route      the key: --api-key (unrestricted) or a tenant's key from --api-keys-file (reloaded on change)
  generation routes    what the request names (`model`, `adapters`; TGI's `parameters.adapter_id`/`adapters`)
                       against the tenant's globs and base_model (403), then its rpm and max_concurrent over the
                       whole deployment (429 + Retry-After); the tokens the replica reports for the request when
                       it ends are charged to the tenant's tpm here, so a tenant over its tpm is refused at the
                       ingress until the minute's tokens fall under it
  tokenize routes      the `model` they name
  /v1/models           the key only; the replica that answers lists what it holds, filtered for the key
Each replica also enforces the same file on the requests it serves (a second check of the same rules; its tpm
reservation, prompt + max_tokens, is per replica since only the replica has tokenized the prompt).
"""
from __future__ import annotations

import json

from server.api.auth import bearer_token
from server.api.generation import adapter_for
from server.api.tenancy import Tenancy
from server.api.tenant_limits import Ticket

GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream")
TOKENIZE_ROUTES = ("/tokenize", "/detokenize")
TGI_ROUTES = ("/generate", "/generate_stream")


class IngressGate:
    def __init__(self, server_config, base_model_name: str) -> None:
        self.tenancy = Tenancy(server_config)
        self.base = base_model_name

    def check(self, headers, route: str, body: bytes) -> Ticket | None:
        """Raise the route's 401/403/429 (SwapserveError); a ticket to finish when the reply ends, for a tenant's
        generation request."""
        tenant = self.tenancy.authenticate(bearer_token(_HeaderView(headers)))
        if tenant is None or route not in GENERATION_ROUTES + TOKENIZE_ROUTES:
            return None
        fields = _fields(body)
        if fields is None:  # not a JSON object: the replica answers 400 (and checks the key again)
            return None
        if route in TOKENIZE_ROUTES and fields.get("model") is None:  # the shared tokenizer: any key may
            return None
        self.tenancy.authorize(tenant, self._names(route, fields), self.base)
        if route in TOKENIZE_ROUTES:
            return None
        return self.tenancy.limits.admit(tenant, 1)  # tokens are charged when the replica reports them

    def _names(self, route: str, fields: dict) -> list[str]:
        """The adapters a body names: every `adapters` entry and an adapter `model` (both: both are checked)."""
        source = fields.get("parameters") if route in TGI_ROUTES else fields
        source = source if isinstance(source, dict) else {}
        model = source.get("adapter_id" if route in TGI_ROUTES else "model")
        names = [adapter_for(_Base(self.base), model)] if isinstance(model, str) else []
        entries = source.get("adapters")
        if isinstance(entries, list):
            names += [e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)]
        return [n for n in names if n]


class _Base:
    def __init__(self, name: str) -> None:
        self.model_name = name


class _HeaderView:
    """What bearer_token reads (request.headers.get) over raw ASGI headers."""

    def __init__(self, headers) -> None:
        self.headers = headers


def _fields(body: bytes) -> dict | None:
    try:
        fields = json.loads(body) if body else {}
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None
