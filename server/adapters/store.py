"""AdapterStore: adapter names -> sources (AdapterSources: adapter roots, explicit paths, allowed Hub ids), the host tier
(LRU with a count and a hard byte budget), single-flight loading off the step loop, unload with in-flight safety.

Tiers: disk (adapter roots, ``adapters_cache/`` for Hub downloads) -> host (AdapterWeights here) -> device
(AdapterManager slots). ``in_flight`` counts requests admitted against an adapter; while > 0 it is pinned in
host memory, and an unloaded adapter keeps its weights (as "retired") until the last such request finishes.
Every read from disk, the first or one after an eviction, re-checks that what it opens lies under the roots
(AdapterDir); every load reserves its bytes under --max-cpu-lora-bytes before reading (HostBudget).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from server.adapters.catalog import target_names
from server.adapters.finite import check_finite
from server.adapters.formats import config_kind
from server.adapters.host_budget import HostBudget
from server.adapters.load_failures import LoadFailure, LoadFailures
from server.adapters.sources import AdapterSources
from server.adapters.weights import AdapterWeights
from server.adapters.load_worker import prepare, shared_worker
from server.config import EngineConfig, valid_adapter_name
from server.errors import AdapterError, UnknownAdapterError

log = logging.getLogger(__name__)


def _lower_thread_priority() -> None:
    """Nice this thread (Linux schedules threads individually), so the step loop wins any CPU contention."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: loads simply run at normal priority
        pass


@dataclass(eq=False)
class AdapterEntry:
    name: str
    source: str  # a local directory, or "hub:org/name[@revision]"
    version: int
    pinned: bool = False
    weights: AdapterWeights | None = None  # set while in the host tier
    future: Future | None = None  # the load in progress (single flight)
    error: str | None = None
    in_flight: int = 0
    on_demand: bool = False  # resolved from an adapter root / the Hub by a request, not loaded by an admin
    trusted: bool = False  # an operator-given path (--lora-modules): read as configured, not held to the roots
    hits: int = 0
    last_used: float | None = None
    load_seconds: float | None = None
    info: dict = field(default_factory=dict)  # kind, rank, size_bytes: known after the first load
    content_hash: bytes = b""  # of the weights last loaded (AdapterWeights.content_hash): keys its KV blocks

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


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
        self.entries: dict[str, AdapterEntry] = {}
        self.retired: dict[tuple[str, int], AdapterEntry] = {}
        self.host: OrderedDict[tuple[str, int], AdapterEntry] = OrderedDict()  # LRU, oldest first
        self.lock = threading.RLock()
        self.budget = HostBudget(config.max_cpu_lora_bytes, config.cpu_lora_wait, self.lock)
        self.failures = LoadFailures()
        # one low-priority thread drives the loads (the work itself runs in the loader process, load_worker.py)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load",
                                           initializer=_lower_thread_priority)
        if config.adapter_loader == "process":
            self.executor.submit(shared_worker().start)  # ready before the first load needs it
        self._versions = 0

    # ---- names and sources ------------------------------------------------------------------------------
    def resolve(self, name: str) -> AdapterEntry:
        """The entry for ``name``, registering it on demand from an adapter root or the allowed Hub."""
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None:
                return entry
            source = self.sources.on_demand(name)
            if source is None:
                raise UnknownAdapterError(f"The model `{name}` does not exist.", param="model")
            entry = self._add(name, source, pinned=False)
            entry.on_demand = True
            return entry

    def check_source(self, source: str) -> str:
        """Validate an admin-supplied source (AdapterSources.check)."""
        return self.sources.check(source)

    def register(self, name: str, source: str, pinned: bool = False, replace: bool = False,
                 trusted: bool = False) -> AdapterEntry:
        """``source``: checked by check_source, or ``trusted`` (an operator's --lora-modules path): only then
        are its reads not held to the adapter roots."""
        if not valid_adapter_name(name):
            raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (max 128)",
                               param="lora_name")
        with self.lock:
            if name in self.entries and not replace:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            if name in self.entries:
                self._retire(self.entries.pop(name))
            return self._add(name, source, pinned, trusted)

    def _add(self, name: str, source: str, pinned: bool, trusted: bool = False) -> AdapterEntry:
        self._versions += 1
        entry = self.entries[name] = AdapterEntry(name, source, self._versions, pinned, trusted=trusted)
        return entry

    def unregister(self, name: str) -> AdapterEntry:
        """The name disappears at once; in-flight requests keep the weights until they finish."""
        with self.lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise UnknownAdapterError(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            self._retire(entry)
            return entry

    def _retire(self, entry: AdapterEntry) -> None:
        if entry.in_flight > 0:
            self.retired[entry.key] = entry
        self.host.pop(entry.key, None)
        self.budget.freed()

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
        except Exception as e:
            self._failed(entry, e)
            raise
        with self.lock:
            self.budget.release(reserved)  # the bytes move from the reservation into the tier (or are dropped)
            entry.error = None
            entry.load_seconds = time.perf_counter() - start
            entry.info = {"type": weights.kind, "rank": weights.rank, "size_bytes": weights.nbytes,
                          "target_modules": target_names(weights.modules)}
            entry.content_hash = bytes.fromhex(weights.content_hash)
            if self.entries.get(entry.name) is entry:
                entry.weights = weights
                self.host[entry.key] = entry
                self._touch(entry)
                self._evict_host(keep=entry)  # never the adapter just loaded: someone is about to use it
                self.failures.forget(entry.name)
            elif entry.key in self.retired:  # unloaded mid-load: serve the in-flight requests, outside the tier
                entry.weights = weights
        self._emit("on_adapter_event", "load", entry.name, entry.load_seconds)
        log.info("adapter %s (%s r=%d, %.1f MB) loaded to host in %.3fs", entry.name, weights.kind, weights.rank,
                 weights.nbytes / 1e6, entry.load_seconds)
        return entry

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
            if entry.on_demand and self.entries.get(entry.name) is entry:
                del self.entries[entry.name]
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
        if entry.key in self.host:
            self.host.move_to_end(entry.key)

    def _evict_host(self, need: int = 0, keep: AdapterEntry | None = None) -> int:
        """Evict idle adapters, least recently used first, while the tier is over --max-cpu-loras or, when
        evicting every idle one would make room, while ``need`` more bytes do not fit --max-cpu-lora-bytes.
        Pinned and in-flight ones (and ``keep``) stay. Returns the bytes held afterwards (held_bytes)."""
        held, budget = self.held_bytes(), self.config.max_cpu_lora_bytes
        idle = [e for e in self.host.values() if not (e.pinned or e.in_flight > 0 or e is keep)]
        can_fit = held - sum(e.weights.nbytes for e in idle) + need <= budget  # else evicting frees nothing useful
        for entry in idle:
            if len(self.host) <= self.config.max_cpu_loras and not (can_fit and held + need > budget):
                break
            del self.host[entry.key]
            held -= entry.weights.nbytes
            entry.weights = None
            self._emit("on_adapter_event", "evict_host", entry.name, None)
        return held

    def held_bytes(self) -> int:
        """Host bytes of the adapters in the tier and of unloaded ones still serving in-flight requests."""
        with self.lock:
            retired = sum(e.weights.nbytes for e in self.retired.values() if e.weights is not None)
            return sum(e.weights.nbytes for e in self.host.values()) + retired

    def host_bytes(self) -> int:
        """held_bytes plus the reservation of the load in progress: never above --max-cpu-lora-bytes."""
        with self.lock:
            return self.held_bytes() + self.budget.reserved

    # ---- used by the engine -----------------------------------------------------------------------------
    def acquire(self, entry: AdapterEntry) -> None:
        with self.lock:
            entry.in_flight += 1
            entry.hits += 1
            self._touch(entry)

    def release(self, key: tuple[str, int]) -> bool:
        """One request on ``key`` finished. True when a retired (unloaded) adapter is now free to drop."""
        with self.lock:
            entry = self.entries.get(key[0])
            if entry is None or entry.key != key:
                entry = self.retired.get(key)
            if entry is None:
                return False
            entry.in_flight -= 1
            self._evict_host()
            self.budget.freed()
            if key in self.retired and entry.in_flight == 0:
                del self.retired[key]
                entry.weights = None
                return True
            return key not in self.retired and entry.key != key

    def weights(self, key: tuple[str, int]) -> AdapterWeights:
        with self.lock:
            entry = self.entries.get(key[0])
            if entry is None or entry.key != key:
                entry = self.retired[key]
            return entry.weights

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
