"""Per-route auth dependencies (never a path-prefix middleware, which a path trick can bypass).

require_api_key:   inference routes; passes when neither --api-key nor --api-keys-file is set, else needs
                   `Authorization: Bearer <key>` with the api key or a tenant's key (server.api.tenancy), and
                   sets request.state.tenant (None: unrestricted) for the routes to authorize what it names.
require_admin:     admin routes; with --admin-key needs `Authorization: Bearer <admin_key>`; without one, only
                   loopback clients pass (and they still need the api key when one is set, and with tenant keys
                   but no api key none passes: a tenant's process on the host is loopback too), and never a
                   request that carries proxy headers: behind a reverse proxy on the same host every client is
                   loopback.
require_metrics:   /metrics; open (as vLLM's) unless --api-keys-file is set: its tenant and adapter names are then
                   for the operator, who scrapes with the admin key (require_admin's rules).
Keys are compared in constant time (hmac.compare_digest on bytes).
"""
from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from server.api.errors import AuthError, ForbiddenError

# headers a reverse proxy adds: a request carrying one came through a proxy, whatever address it comes from
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip")


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names, None and anything else."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _check_key(request: Request, expected: str, what: str) -> None:
    if not key_matches(bearer_token(request), expected):
        raise AuthError(f"missing or invalid {what} (send 'Authorization: Bearer <key>')")


async def require_api_key(request: Request) -> None:
    request.state.tenant = request.app.state.tenancy.authenticate(bearer_token(request))


def tenant_of(request: Request):
    """The tenant require_api_key found (None: unrestricted)."""
    return getattr(request.state, "tenant", None)


async def require_admin(request: Request) -> None:
    config = request.app.state.server_config
    if config.admin_key is not None:
        _check_key(request, config.admin_key, "admin key")
        return
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise ForbiddenError("admin routes answer loopback clients only when no --admin-key is set")
    proxied = next((h for h in PROXY_HEADERS if h in request.headers), None)
    if proxied is not None:
        raise ForbiddenError(f"admin routes without --admin-key answer direct loopback clients only, and this "
                             f"request came through a proxy ({proxied} header); start the server with "
                             "--admin-key (or SWAPSERVE_ADMIN_KEY) and send 'Authorization: Bearer <key>'")
    if config.api_key is not None:
        _check_key(request, config.api_key, "API key")
    elif config.api_keys_file is not None:
        raise ForbiddenError("with --api-keys-file, the admin routes (and /metrics) need --admin-key (or the "
                             "unrestricted --api-key on a loopback client): a tenant on this host is a loopback "
                             "client too")


async def require_metrics(request: Request) -> None:
    if request.app.state.server_config.api_keys_file is not None:
        await require_admin(request)
