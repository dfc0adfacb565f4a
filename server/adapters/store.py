"""AdapterStore: adapter names -> sources (adapter roots, explicit paths, allowed Hub ids), the host tier
(LRU with a count and a byte budget), single-flight loading off the step loop, unload with in-flight safety.

Tiers: disk (adapter roots, ``adapters_cache/`` for Hub downloads) -> host (AdapterWeights here) -> device
(AdapterManager slots). ``in_flight`` counts requests admitted against an adapter; while > 0 it is pinned in
host memory, and an unloaded adapter keeps its weights (as "retired") until the last such request finishes.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from server.adapters.formats import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.weights import AdapterWeights
from server.adapters.load_worker import prepare, shared_worker
from server.config import EngineConfig, valid_adapter_name
from server.errors import AdapterError, AdapterNotAllowedError, UnknownAdapterError

log = logging.getLogger(__name__)
HUB_ID_RE = re.compile(r"^(?:hub:)?([A-Za-z0-9][A-Za-z0-9_.-]{0,95})/([A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@([A-Za-z0-9_.-]{1,64}))?$")


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
                 finish: Callable[[AdapterWeights], None] | None = None):
        """banks: the device tier's SlotBank layout (AdapterManager.layout); loads pack adapters for it.
        finish: run on each loaded adapter, still on the loader thread (ModelRunner.prepare_dora)."""
        self.config = config
        self.targets = targets
        self.banks = banks
        self.finish = finish
        self.base_model_name = base_model_name
        self.observers = observers
        self.roots = [Path(r).resolve() for r in config.adapter_roots]
        self.entries: dict[str, AdapterEntry] = {}
        self.retired: dict[tuple[str, int], AdapterEntry] = {}
        self.host: OrderedDict[tuple[str, int], AdapterEntry] = OrderedDict()  # LRU, oldest first
        self.lock = threading.RLock()
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
            source = self._on_demand_source(name)
            if source is None:
                raise UnknownAdapterError(f"The model `{name}` does not exist.", param="model")
            entry = self._add(name, source, pinned=False)
            entry.on_demand = True
            return entry

    def _on_demand_source(self, name: str) -> str | None:
        if valid_adapter_name(name):
            for root in self.roots:
                candidate = root / name
                if (candidate / CONFIG_FILE).is_file():
                    return str(self.under_roots(str(candidate)))  # refuses symlinks leading outside the root
            return None
        if self.config.allow_hub_adapters and HUB_ID_RE.match(name) and self._hub_allowed(name):
            return "hub:" + name.removeprefix("hub:")
        return None

    def _hub_allowed(self, source: str) -> bool:
        org = HUB_ID_RE.match(source).group(1)
        return org in self.config.hub_adapter_orgs

    def check_source(self, source: str) -> str:
        """Validate an admin-supplied source: a path under an adapter root, or an allowed Hub id."""
        if HUB_ID_RE.match(source) and not Path(source).exists():
            if not self.config.allow_hub_adapters:
                raise AdapterNotAllowedError(f"{source}: Hub adapters are disabled (start with --allow-hub-adapters)")
            if not self._hub_allowed(source):
                raise AdapterNotAllowedError(f"{source}: organization not in --hub-adapter-org allowlist")
            return "hub:" + source.removeprefix("hub:")
        return str(self.under_roots(source))

    def under_roots(self, source: str) -> Path:
        if not self.roots:
            raise AdapterNotAllowedError("loading adapters by path needs an --adapter-root; none is configured")
        raw = Path(source)
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self.roots]
        for cand in candidates:
            real = Path(os.path.realpath(cand))
            root = next((r for r in self.roots if real == r or r in real.parents), None)
            if root is not None and real.is_dir():
                for f in (CONFIG_FILE, WEIGHTS_FILE):  # a symlinked file must not point outside the root either
                    target = Path(os.path.realpath(real / f))
                    if (real / f).exists() and root not in target.parents:
                        raise AdapterNotAllowedError(f"{real / f}: resolves outside the adapter root {root}")
                return real
        raise AdapterNotAllowedError(f"{source}: not a directory under an --adapter-root "
                                     f"({', '.join(map(str, self.roots))})")

    def register(self, name: str, source: str, pinned: bool = False, replace: bool = False) -> AdapterEntry:
        if not valid_adapter_name(name):
            raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' and '-' (max 128)",
                               param="lora_name")
        with self.lock:
            if name in self.entries and not replace:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
            if name in self.entries:
                self._retire(self.entries.pop(name))
            return self._add(name, source, pinned)

    def _add(self, name: str, source: str, pinned: bool) -> AdapterEntry:
        self._versions += 1
        entry = self.entries[name] = AdapterEntry(name, source, self._versions, pinned)
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
            directory = self._materialize(entry.source)
            weights = self._read(directory, entry.name)
            if self.finish is not None:
                self.finish(weights)
        except Exception as e:
            entry.error = getattr(e, "message", None) or str(e)
            log.warning("adapter %s failed to load: %s", entry.name, entry.error)
            with self.lock:  # an on-demand name that cannot load is not listed; the next request retries it
                if entry.on_demand and self.entries.get(entry.name) is entry:
                    del self.entries[entry.name]
            raise
        with self.lock:
            entry.error = None
            entry.load_seconds = time.perf_counter() - start
            entry.info = {"type": weights.kind, "rank": weights.rank, "size_bytes": weights.nbytes}
            entry.content_hash = bytes.fromhex(weights.content_hash)
            if self.entries.get(entry.name) is entry:
                entry.weights = weights
                self.host[entry.key] = entry
                self._touch(entry)
                self._evict_host(keep=entry)  # never the adapter just loaded: someone is about to use it
            elif entry.key in self.retired:  # unloaded mid-load: serve the in-flight requests, outside the tier
                entry.weights = weights
        self._emit("on_adapter_event", "load", entry.name, entry.load_seconds)
        log.info("adapter %s (%s r=%d, %.1f MB) loaded to host in %.3fs", entry.name, weights.kind, weights.rank,
                 weights.nbytes / 1e6, entry.load_seconds)
        return entry

    def _read(self, directory: Path, name: str) -> AdapterWeights:
        """Read, validate against the base and pack one adapter: in the loader process (load_worker.py), or
        on this thread with --adapter-loader thread."""
        load = shared_worker().load if self.config.adapter_loader == "process" else prepare
        return load(directory=str(directory), name=name, max_bytes=self.config.max_adapter_bytes,
                    targets=self.targets, max_rank=self.config.max_lora_rank,
                    base_model_name=self.base_model_name, banks=self.banks)

    def _materialize(self, source: str) -> Path:
        if not source.startswith("hub:"):
            return Path(source)
        from huggingface_hub import snapshot_download

        org, repo, revision = HUB_ID_RE.match(source).groups()
        return Path(snapshot_download(f"{org}/{repo}", revision=revision, cache_dir=self.config.adapters_cache,
                                      allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))

    def _touch(self, entry: AdapterEntry) -> None:
        entry.last_used = time.time()
        if entry.key in self.host:
            self.host.move_to_end(entry.key)

    def _evict_host(self, keep: AdapterEntry | None = None) -> None:
        def over() -> bool:
            total = sum(e.weights.nbytes for e in self.host.values())
            return len(self.host) > self.config.max_cpu_loras or total > self.config.max_cpu_lora_bytes

        for key in list(self.host):
            if not over():
                break
            entry = self.host[key]
            if entry.pinned or entry.in_flight > 0 or entry is keep:
                continue
            del self.host[key]
            entry.weights = None
            self._emit("on_adapter_event", "evict_host", entry.name, None)

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
        self.executor.shutdown(wait=False, cancel_futures=True)
