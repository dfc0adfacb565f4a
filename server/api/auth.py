"""Per-route auth dependencies (never a path-prefix middleware, which a path trick can bypass).

require_api_key:   inference routes; passes when no --api-key is set, else needs `Authorization: Bearer <api_key>`.
require_admin:     admin routes; with --admin-key needs `Authorization: Bearer <admin_key>`; without one, only
                   loopback clients pass (and they still need the api key when one is set).
Keys are compared in constant time (hmac.compare_digest on bytes).
"""
from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from server.api.errors import AuthError, ForbiddenError


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
    config = request.app.state.server_config
    if config.api_key is not None:
        _check_key(request, config.api_key, "API key")


async def require_admin(request: Request) -> None:
    config = request.app.state.server_config
    if config.admin_key is not None:
        _check_key(request, config.admin_key, "admin key")
        return
    client = request.client.host if request.client else None
    if not is_loopback(client):
        raise ForbiddenError("admin routes answer loopback clients only when no --admin-key is set")
    if config.api_key is not None:
        _check_key(request, config.api_key, "API key")
