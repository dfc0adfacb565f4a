"""LoadFailures: why recent on-demand adapter loads failed, by adapter name.

A name whose on-demand load failed is no adapter: it leaves the store (and /v1/models, /v1/adapters), and the
next request retries it. What went wrong is kept here for a while, so GET /v1/adapters/{name} can still say
why. Bounded in time and in count: the names come from clients (only ones that resolved to a source, but still).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadFailure:
    name: str
    source: str
    error: str
    failed_at: float  # unix seconds
    status_code: int  # what the failed requests were answered

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.failed_at))
        return f"its on-demand load from {self.source} failed at {when} (answered {self.status_code}): {self.error}"


class LoadFailures:
    def __init__(self, ttl_s: float = 600.0, max_count: int = 256):
        self.ttl_s = ttl_s
        self.max_count = max_count
        self._failures: OrderedDict[str, tuple[float, LoadFailure]] = OrderedDict()  # oldest first

    def record(self, failure: LoadFailure) -> None:
        self._failures.pop(failure.name, None)
        self._failures[failure.name] = (time.monotonic(), failure)
        while len(self._failures) > self.max_count:
            self._failures.popitem(last=False)

    def get(self, name: str) -> LoadFailure | None:
        """The last failure of ``name`` within ttl_s, or None."""
        self._expire()
        item = self._failures.get(name)
        return None if item is None else item[1]

    def recent(self) -> list[LoadFailure]:
        """The failures within ttl_s, oldest first."""
        self._expire()
        return [failure for _, failure in self._failures.values()]

    def forget(self, name: str) -> None:
        self._failures.pop(name, None)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._failures and next(iter(self._failures.values()))[0] < cutoff:
            self._failures.popitem(last=False)
