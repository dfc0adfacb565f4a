"""AdapterStore: adapter names -> sources (AdapterSources: adapter roots, explicit paths, allowed Hub ids) and
versions (AdapterCatalog, catalog.py), the host tier (LRU of versions with a count and a hard byte budget),
single-flight loading off the step loop, unload with in-flight safety.

Tiers: disk (adapter roots, ``adapters_cache/`` for Hub downloads) -> host (AdapterWeights here) -> device
(AdapterManager slots). The host tier and the device slots hold each content version once, whatever names
it has. ``in_flight`` counts requests admitted against an adapter; while > 0 its version is pinned in host
memory, and a version no name holds any more keeps its weights (as "retired") until the last such request
finishes. Every read from disk, the first or one after an eviction, re-checks that what it opens lies under the
roots (AdapterDir), and a re-read must find the content it had; every load reserves its bytes under
--max-cpu-lora-bytes before reading (HostBudget).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from server.adapters.finite import check_finite
from server.adapters.formats import config_kind
from server.adapters.host_budget import HostBudget
from server.adapters.load_failures import LoadFailure, LoadFailures
from server.adapters.sources import AdapterSources
from server.adapters.catalog import AdapterEntry, AdapterCatalog
from server.adapters.versions import AdapterVersion, version_of
from server.adapters.weights import AdapterWeights
from server.adapters.load_worker import prepare, shared_worker
from server.config import EngineConfig, valid_adapter_name
from server.errors import AdapterError, AdapterExistsError, UnknownAdapterError

log = logging.getLogger(__name__)


def _lower_thread_priority() -> None:
    """Nice this thread (Linux schedules threads individually), so the step loop wins any CPU contention."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: loads simply run at normal priority
        pass


class AdapterStore:
    def __init__(self, config: EngineConfig, targets: dict[str, tuple[int, int]], base_model_name: str,
                 observers=(), banks: list[list[str]] | None = None,
                 finish: Callable[[AdapterWeights], None] | None = None, dtype: torch.dtype = torch.float32):
        """banks: the device tier's SlotBank layout (AdapterManager.layout); loads pack adapters for it.
        finish: run on each loaded adapter, still on the loader thread (ModelRunner.prepare_dora).
        dtype: what the device slots hold (ModelRunner.dtype); loads refuse adapters whose values would not stay
        finite in it."""
        self.config = config
        self.dtype = dtype
        self.targets = targets
        self.banks = banks
        self.finish = finish
        self.base_model_name = base_model_name
        self.observers = observers
        self.sources = AdapterSources(config)
        self.roots = self.sources.roots
        self.catalog = AdapterCatalog()
        self.host: OrderedDict[str, AdapterVersion] = OrderedDict()  # LRU, oldest first
        self.lock = threading.RLock()
        self.budget = HostBudget(config.max_cpu_lora_bytes, config.cpu_lora_wait, self.lock)
        self.failures = LoadFailures()
        self.loads = 0  # reads that put a new copy in the host tier
        self.evictions = 0  # versions evicted from the host tier
        # one low-priority thread drives the loads (the work itself runs in the loader process, load_worker.py)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load",
                                           initializer=_lower_thread_priority)
        if config.adapter_loader == "process":
            self.executor.submit(shared_worker().start)  # ready before the first load needs it

    # the catalog's state, read under self.lock
    entries = property(lambda self: self.catalog.entries)
    history = property(lambda self: self.catalog.history)
    versions = property(lambda self: self.catalog.versions)
    retired = property(lambda self: self.catalog.retired)
    splits = property(lambda self: self.catalog.splits)

    # ---- names, sources and versions ---------------------------------------------------------------------
    def resolve(self, name: str, user: str | None = None) -> AdapterEntry:
        """The entry a request for ``name`` reads: ``name@version`` pins a version (404 when the name has no such
        version); a name with a traffic split goes to one of its versions (pick_version, sticky per ``user``);
        else the name's current entry, registered on demand from an adapter root or the allowed Hub."""
        with self.lock:
            entry = self.catalog.lookup(name, user)
            if entry is not None:
                return self._reread(name, entry)
            source = self.sources.on_demand(name)
            if source is None:
                raise UnknownAdapterError(f"The model `{name}` does not exist.", param="model")
            return self.catalog.add(AdapterEntry(name, source, on_demand=True))

    def _reread(self, name: str, entry: AdapterEntry) -> AdapterEntry:
        """An on-demand name whose current version has left host memory is read from its source again as a
        reload is (AdapterCatalog.add puts it aside until it has loaded): the same files give the same version
        back, files changed meanwhile become the name's new version (the old one can never be read again and is
        forgotten) instead of failing the request. A pinned ``name@version``, and a name in a traffic split
        (routed by version), read what they name."""
        if not (entry.on_demand and entry.content is not None and entry.weights is None and name == entry.name
                and self.entries.get(name) is entry and name not in self.splits):
            return entry
        pending = self.catalog.pending.get(name)
        if pending is None:
            pending = self.catalog.add(AdapterEntry(name, entry.source, entry.pinned, on_demand=True,
                                                    trusted=entry.trusted))
        return pending

    def check_source(self, source: str) -> str:
        """Validate an admin-supplied source (AdapterSources.check)."""
        return self.sources.check(source)

    def register(self, name: str, source: str, pinned: bool = False, replace: bool = False,
                 trusted: bool = False) -> AdapterEntry:
        """``source``: checked by check_source, or ``trusted`` (an operator's --lora-modules path): only then
        are its reads not held to the adapter roots. With ``replace`` the name points at the new entry at once;
        its older versions stay in its history (see restore for a reload that fails)."""
        if not valid_adapter_name(name):
            raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (max 128)",
                               param="lora_name")
        with self.lock:
            if name in self.entries and not replace:
                raise AdapterExistsError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            return self.catalog.add(AdapterEntry(name, source, pinned, trusted=trusted))

    def restore(self, entry: AdapterEntry, previous: AdapterEntry | None) -> None:
        """``entry``'s load failed: point its name back at ``previous`` (the entry it replaced) while that one's
        version is still held, else forget the name."""
        with self.lock:
            self.catalog.restore(entry, previous)

    def unregister(self, name: str, version: str | None = None) -> AdapterEntry:
        """Forget ``name`` (every version), or only its ``version`` (not its current one: roll back first). The
        name or version disappears at once; in-flight requests keep the weights until they finish."""
        with self.lock:
            if version is not None:
                entry, dropped = self.catalog.forget_version(name, version)
            else:
                entry = self.entries.get(name)
                dropped = self.catalog.forget(name)
            self._dropped(dropped)
            return entry

    def _dropped(self, contents: list[AdapterVersion]) -> None:
        """Versions no name holds any more leave the host tier (retired ones keep their weights meanwhile)."""
        for content in contents:
            self.host.pop(content.key, None)
            if content.key not in self.retired:
                content.weights = None
        if contents:
            self.budget.freed()

    def rollback(self, name: str, version: str) -> AdapterEntry:
        """Point ``name`` back at one of its loaded versions."""
        with self.lock:
            return self.catalog.rollback(name, version)

    def set_split(self, name: str, split: dict | None) -> dict[str, float] | None:
        """Route requests for ``name`` by ``split`` ({version: weight}, summing to 100; check_split); None
        removes the split (requests go to the current version again)."""
        with self.lock:
            return self.catalog.set_split(name, split)

    def version_list(self, name: str) -> list[str]:
        with self.lock:
            return self.catalog.version_list(name)

    def known(self, key: str) -> bool:
        """Whether some name, or a request in flight, still holds the version keyed ``key`` (AdapterEntry.key)."""
        with self.lock:
            return self.catalog.known(key)

    def sources_of(self, name: str) -> list[str]:
        """Where ``name``'s current entry, its loaded versions and a reload still loading are read from."""
        with self.lock:
            current = [self.entries.get(name), self.catalog.pending.get(name)]
            held = [e.source for e in self.history.get(name, {}).values()]
            return held + [e.source for e in current if e is not None]

    def keys_of(self, name: str) -> list[str]:
        """The keys of ``name``'s loaded versions (what its device slots are keyed by)."""
        with self.lock:
            return self.catalog.keys_of(name)

    def pinned(self, content: AdapterVersion) -> bool:
        """Whether ``content`` must stay in host memory (AdapterCatalog.pinned: pinned, or in a traffic split)."""
        with self.lock:
            return self.catalog.pinned(content)

    # ---- loading (off the step loop) --------------------------------------------------------------------
    def ensure_host(self, entry: AdapterEntry) -> Future:
        """Start (or join) the load of ``entry`` into host memory; at most one load per entry at a time."""
        with self.lock:
            if entry.weights is not None:
                self._touch(entry)
                self._emit("on_adapter_event", "hit", entry.name, None)
                fut: Future = Future()
                fut.set_result(entry)
                return fut
            self._emit("on_adapter_event", "miss", entry.name, None)
            if entry.future is None or entry.future.done():
                entry.future = self.executor.submit(self._load, entry)
            return entry.future

    def _load(self, entry: AdapterEntry) -> AdapterEntry:
        start = time.perf_counter()
        try:
            weights, reserved = self._fetch(entry)
            version = version_of(weights.content_hash)
            if entry.content is not None and entry.key != weights.content_hash:
                self.budget.release(reserved)
                raise AdapterError(f"{entry.source}: its files changed since version {entry.version} of "
                                   f"'{entry.name}' was loaded (they are version {version} now); load the "
                                   "adapter again to serve the new content", param="model")
        except Exception as e:
            self._failed(entry, e)
            raise
        with self.lock:
            self.budget.release(reserved)  # the bytes move from the reservation into the tier (or are dropped)
            entry.error = None
            entry.load_seconds = time.perf_counter() - start
            content = self.catalog.bind(entry, weights)
            if content.weights is None:
                content.weights = weights
                self.loads += 1
            # else: the same content is already in memory (another name, or a reload of the same files): this
            # copy is dropped, so each version is held once
            self._place(entry, content)
        self._emit("on_adapter_event", "load", entry.name, entry.load_seconds)
        log.info("adapter %s version %s (%s r=%d, %.1f MB) loaded to host in %.3fs", entry.name, version,
                 weights.kind, weights.rank, weights.nbytes / 1e6, entry.load_seconds)
        return entry

    def _place(self, entry: AdapterEntry, content: AdapterVersion) -> None:
        """Enter a freshly read ``content`` in the name's history (AdapterCatalog.place) and the host tier."""
        before = self.catalog.entries.get(entry.name)
        held = self.catalog.place(entry, content)
        if held is None:
            return
        if before is not None and before is not held and before.source == held.source:
            self._dropped(self.catalog.forget_unreadable(entry.name, before))
        self.host.setdefault(content.key, content)
        self._touch(held)
        self._evict_host(keep=content)  # never the adapter just loaded: someone is about to use it
        self.failures.forget(entry.name)

    def _fetch(self, entry: AdapterEntry) -> tuple[AdapterWeights, int]:
        """Read ``entry`` within the host budget: reserve its estimated bytes (waiting for room), read, then
        settle the reservation on its true size. Returns the weights and the bytes reserved for them."""
        directory = self.sources.materialize(entry.source)
        roots = self.sources.roots_for(entry.source, entry.trusted)
        deadline = self.budget.deadline()
        reserved = self.budget.estimate(directory, roots, self.config.max_adapter_bytes)
        self.budget.reserve(reserved, deadline, self._evict_host, str(directory))
        try:
            weights = self._read(directory, entry.name, roots)
            if self.finish is not None:
                self.finish(weights)
                if weights.use_dora:  # its factors (d, the slot's B) were computed just now: check them too
                    check_finite(weights, self.dtype)
            reserved = self.budget.settle(reserved, weights.nbytes, deadline, self._evict_host, str(directory))
        except BaseException:
            self.budget.release(reserved)
            raise
        return weights, reserved

    def _failed(self, entry: AdapterEntry, e: Exception) -> None:
        entry.error = getattr(e, "message", None) or str(e)
        log.warning("adapter %s failed to load: %s", entry.name, entry.error)
        with self.lock:  # an on-demand name that cannot load is not listed; the next request retries it
            if self.catalog.pending.get(entry.name) is entry:
                self.catalog.restore(entry, None)  # a failed reload: the name keeps its version...
                current = self.entries.get(entry.name)
                if not entry.on_demand or current is None:
                    return
                entry = current  # ...but a failed re-read (_reread) leaves none it can read
            if entry.on_demand and self.entries.get(entry.name) is entry:
                self._dropped(self.catalog.forget(entry.name))
                self.failures.record(LoadFailure(entry.name, entry.source, entry.error, time.time(),
                                                 getattr(e, "status_code", 400)))

    def failure(self, name: str) -> LoadFailure | None:
        """Why the last on-demand load of ``name`` failed, if it did within the last LoadFailures.ttl_s."""
        with self.lock:
            return self.failures.get(name)

    def recent_failures(self) -> list[LoadFailure]:
        """The on-demand loads that failed within LoadFailures.ttl_s, oldest first."""
        with self.lock:
            return self.failures.recent()

    def declared_kind(self, entry: AdapterEntry) -> str | None:
        """``entry``'s kind (lora, adalora, dora, ia3) without loading it: recorded by its first load, else what
        the config of its local directory declares; None for a Hub adapter not loaded yet, or a directory that
        cannot be opened (its load will say why)."""
        kind = entry.info.get("type")
        if kind is not None or entry.source.startswith("hub:"):
            return kind
        try:
            return config_kind(entry.source, self.sources.roots_for(entry.source, entry.trusted))
        except OSError:
            return None

    def _read(self, directory: Path, name: str, roots: list[Path] | None) -> AdapterWeights:
        """Read, validate against the base and pack one adapter: in the loader process (load_worker.py), or
        on this thread with --adapter-loader thread. Both re-check the roots on what they open."""
        load = shared_worker().load if self.config.adapter_loader == "process" else prepare
        return load(directory=str(directory), name=name, max_bytes=self.config.max_adapter_bytes,
                    targets=self.targets, max_rank=self.config.max_lora_rank,
                    base_model_name=self.base_model_name, banks=self.banks,
                    roots=None if roots is None else [str(r) for r in roots], dtype=self.dtype)

    def _touch(self, entry: AdapterEntry) -> None:
        entry.last_used = time.time()
        if entry.content is not None:
            entry.content.last_used = entry.last_used
            if entry.key in self.host:
                self.host.move_to_end(entry.key)

    def _evict_host(self, need: int = 0, keep: AdapterVersion | None = None) -> int:
        """Evict idle versions, least recently used first, while the tier is over --max-cpu-loras or, when
        evicting every idle one would make room, while ``need`` more bytes do not fit --max-cpu-lora-bytes.
        Pinned ones (also those in a traffic split), in-flight ones and ``keep`` stay. A version no name has as
        its current one is forgotten when evicted (its source may hold other files by now). Returns the bytes
        held afterwards (held_bytes)."""
        held, budget = self.held_bytes(), self.config.max_cpu_lora_bytes
        idle = [c for c in self.host.values() if not (c.in_flight > 0 or c is keep or self.catalog.pinned(c))]
        can_fit = held - sum(c.weights.nbytes for c in idle) + need <= budget  # else evicting frees nothing useful
        for content in idle:
            if len(self.host) <= self.config.max_cpu_loras and not (can_fit and held + need > budget):
                break
            del self.host[content.key]
            held -= content.weights.nbytes
            content.weights = None
            self.evictions += 1
            self._emit("on_adapter_event", "evict_host", ",".join(sorted(content.names)) or content.version, None)
            dropped, forgotten = self.catalog.forget_older(content)
            self._dropped(dropped)
            for entry in forgotten:  # the merger deletes a merged version's files (AsyncEngine)
                self._emit("on_version_forgotten", entry.name, entry.source)
        return held

    def held_bytes(self) -> int:
        """Host bytes of the versions in the tier and of retired ones still serving in-flight requests."""
        with self.lock:
            retired = sum(c.weights.nbytes for c in self.retired.values() if c.weights is not None)
            return sum(c.weights.nbytes for c in self.host.values()) + retired

    def host_bytes(self) -> int:
        """held_bytes plus the reservation of the load in progress: never above --max-cpu-lora-bytes."""
        with self.lock:
            return self.held_bytes() + self.budget.reserved

    # ---- used by the engine -----------------------------------------------------------------------------
    def acquire(self, entry: AdapterEntry) -> None:
        with self.lock:
            entry = entry.merged_into or entry
            entry.in_flight += 1
            entry.hits += 1
            if entry.content is not None:
                entry.content.in_flight += 1
            self._touch(entry)

    def release(self, entry: AdapterEntry) -> str | None:
        """One request on ``entry`` finished. Returns its key when that version was retired (no name holds it)
        and is now free: the engine then frees its device slot."""
        with self.lock:
            entry = entry.merged_into or entry
            entry.in_flight -= 1
            content = entry.content
            if content is not None:
                content.in_flight -= 1
            self._evict_host()
            self.budget.freed()
            return content.key if self.catalog.finished(content) else None

    def weights(self, key: str) -> AdapterWeights:
        with self.lock:
            return self.catalog.get(key).weights

    def tier_counts(self, device_keys) -> dict[str, int]:
        with self.lock:
            return {"device": len(device_keys), "host": len(self.host), "disk": len(self.entries)}

    def _emit(self, method: str, *args) -> None:
        for obs in self.observers:
            fn = getattr(obs, method, None)
            if fn:
                fn(*args)

    def close(self) -> None:
        self.budget.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
