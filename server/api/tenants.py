"""TenantKeys: the --api-keys-file as loaded, reloaded when it changes, and what each key may reach.

Reload: every lookup stats the file (one stat call) and re-reads it when its (mtime, size, inode) changed, so
edits apply to the next request without a restart. A file that no longer parses (or is gone) keeps the keys
that were loaded and logs the error once per change of the file; the log names the line, never a key. Replace
the file atomically (write a temporary file, then rename it over the old one) so no request reads half of it.

Lookup compares the SHA-256 of the presented token with every tenant's digest in constant time
(hmac.compare_digest, no early exit), so neither a key nor which entry matched leaks through timing.
"""
from __future__ import annotations

import hmac
import logging
import os
import threading

from server.api.errors import ForbiddenError
from server.api.tenant_keys import KeyFileError, Tenant, key_digest, load_key_file

log = logging.getLogger("swapserve.tenants")


class TenantKeys:
    def __init__(self, path: str, reserved: dict[str, str | None] | None = None) -> None:
        """Loads ``path`` now: a KeyFileError here means the server must not start."""
        self.path = path
        self.reserved = dict(reserved or {})
        self._lock = threading.Lock()
        self._signature = _signature(path)
        self._failed_signature: tuple | None = None
        self.tenants: list[Tenant] = load_key_file(path, self.reserved)
        self.generation = 1  # bumped on every successful reload

    def lookup(self, token: str | None) -> Tenant | None:
        """The tenant whose key is ``token``, or None; reloads the file first when it changed."""
        self.reload_if_changed()
        if token is None:
            return None
        digest, found = key_digest(token), None
        for tenant in self.tenants:
            if hmac.compare_digest(digest, tenant.digest):
                found = tenant
        return found

    def reload_if_changed(self) -> bool:
        """Re-read the file when its stat changed; True when new keys were taken."""
        signature = _signature(self.path)
        if signature == self._signature or signature == self._failed_signature:
            return False
        with self._lock:
            if signature == self._signature:
                return False
            try:
                tenants = load_key_file(self.path, self.reserved)
            except KeyFileError as exc:
                if signature != self._failed_signature:
                    log.error("%s; keeping the %d keys loaded before", exc, len(self.tenants))
                self._failed_signature = signature
                return False
            self.tenants, self._signature, self._failed_signature = tenants, signature, None
            self.generation += 1
        log.info("--api-keys-file %s reloaded: %d tenants (%s)", self.path, len(tenants),
                 ", ".join(t.name for t in tenants))
        return True


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


def authorize(tenant: Tenant | None, adapters: list[str], base_model_name: str) -> None:
    """403 (permission_error) unless ``tenant`` may use every adapter in ``adapters``, or, when there are none,
    the base model on its own. None (no key file, or the unrestricted --api-key) may use everything. Runs before
    a name is resolved, so a denied name is never loaded on demand, and a denied name that does not exist gets
    the same 403 as one that does."""
    if tenant is None:
        return
    if not adapters:
        if not tenant.base_model:
            raise ForbiddenError(f"this API key ({tenant.name}) may not use the base model {base_model_name!r} on "
                                 "its own; name one of its adapters", "model")
        return
    denied = next((a for a in adapters if not tenant.may_use(a)), None)
    if denied is not None:
        raise ForbiddenError(f"this API key ({tenant.name}) may not use the adapter {denied!r}",
                             "adapters" if len(adapters) > 1 else "model")


def visible(tenant: Tenant | None, adapter: str | None) -> bool:
    """Whether /v1/models shows ``adapter`` (None: the base model) to ``tenant``."""
    if tenant is None:
        return True
    return tenant.base_model if adapter is None else tenant.may_use(adapter)
