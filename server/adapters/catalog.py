"""AdapterCatalog: adapter names -> entries -> versions, the bookkeeping half of the AdapterStore (no I/O, no
lock of its own: the store's lock guards every call).

Identity is content (versions.py): each load of a name gives an AdapterEntry (that name bound to one load); once
read, the entry points at the AdapterVersion of its content, shared by every name with the same content.
``entries`` maps a name to its current entry; ``history`` keeps each name's loaded versions, addressable as
``name@version`` until unloaded or, for one that is no longer current, evicted from host memory (its source may
hold other files by now). A version no name holds any more is dropped, or kept as "retired" while requests in
flight still read it.
"""
from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from server.adapters.disk_listing import target_names
from server.adapters.versions import AdapterVersion, check_split, pick_version, split_pin, unknown_version
from server.adapters.weights import AdapterWeights
from server.errors import AdapterError, ReloadInProgressError, UnknownAdapterError


@dataclass(eq=False)
class AdapterEntry:
    """One name bound to one load: its source, and (once read) the version of what it read."""

    name: str
    source: str  # a local directory, or "hub:org/name[@revision]"
    pinned: bool = False
    content: AdapterVersion | None = None  # set by the first read; never changes afterwards
    future: Future | None = None  # the load in progress (single flight)
    error: str | None = None
    in_flight: int = 0
    on_demand: bool = False  # resolved from an adapter root / the Hub by a request, not loaded by an admin
    trusted: bool = False  # an operator-given path (--lora-modules): read as configured, not held to the roots
    hits: int = 0
    last_used: float | None = None
    load_seconds: float | None = None
    created: float = field(default_factory=time.time)
    merged_into: AdapterEntry | None = None  # a reload that found the version its name held: that version's entry

    @property
    def version(self) -> str | None:
        return None if self.content is None else self.content.version

    @property
    def key(self) -> str | None:
        """The device-slot and host-tier key: the whole content hash, hex (None until the first read)."""
        return None if self.content is None else self.content.key

    @property
    def weights(self) -> AdapterWeights | None:
        return None if self.content is None else self.content.weights

    @property
    def content_hash(self) -> bytes:
        """Keys its KV blocks (BlockManager): what it computes, whatever it is called."""
        return b"" if self.content is None else self.content.content_hash

    @property
    def info(self) -> dict:
        return {} if self.content is None else self.content.info


def _unknown(name: str, param: str = "lora_name") -> UnknownAdapterError:
    return UnknownAdapterError(f"The lora adapter '{name}' cannot be found.", param=param)


class AdapterCatalog:
    def __init__(self, rng: random.Random | None = None):
        self.entries: dict[str, AdapterEntry] = {}  # name -> its current entry
        self.pending: dict[str, AdapterEntry] = {}  # name -> a reload still loading (current once placed)
        self.history: dict[str, dict[str, AdapterEntry]] = {}  # name -> {version: entry}, in load order
        self.versions: dict[str, AdapterVersion] = {}  # key -> every version some name holds
        self.retired: dict[str, AdapterVersion] = {}  # key -> versions no name holds, kept for requests in flight
        self.splits: dict[str, dict[str, float]] = {}  # name -> canary split {version: weight}
        self.rng = rng or random.Random()

    # ---- names --------------------------------------------------------------------------------------------
    def lookup(self, name: str, user: str | None) -> AdapterEntry | None:
        """The entry a request for ``name`` reads (see AdapterStore.resolve); None for a name not registered."""
        base, version = split_pin(name)
        if version is not None and base in self.entries:
            entry = self.history.get(base, {}).get(version)
            if entry is None:
                raise unknown_version(base, version, self.version_list(base))
            return entry
        entry = self.entries.get(name)
        split = self.splits.get(name)
        if entry is None or split is None:
            return entry
        return self.history[name][pick_version(split, name, user, self.rng)]

    def add(self, entry: AdapterEntry) -> AdapterEntry:
        """``entry`` becomes its name's current entry (the versions it had stay in its history). A reload of a
        name whose current version is loaded waits in ``pending`` instead: requests keep resolving to the
        version the name serves until the new one has loaded (place), and a failed reload leaves it there."""
        current = self.entries.get(entry.name)
        waiting = self.pending.get(entry.name)
        if waiting is not None and not waiting.on_demand:  # an on-demand re-read gives way to an admin's reload
            raise ReloadInProgressError(f"a reload of '{entry.name}' (from {waiting.source}) is still loading; "
                                        "retry once it has finished", param="lora_name")
        if current is not None and current.version is not None:
            self.pending[entry.name] = entry
        else:
            self.entries[entry.name] = entry
        return entry

    def restore(self, entry: AdapterEntry, previous: AdapterEntry | None) -> None:
        """``entry``'s load failed: point its name back at ``previous`` (the entry it replaced) while that one's
        version is still held, else at its latest loaded version; a name with none is forgotten."""
        if self.pending.get(entry.name) is entry:
            del self.pending[entry.name]  # the name never left the version it serves
            return
        if self.entries.get(entry.name) is not entry:
            return
        held = self.history.get(entry.name, {})
        if previous is not None and held.get(previous.version) is previous:
            self.entries[entry.name] = previous
        elif held:
            self.entries[entry.name] = list(held.values())[-1]
        else:
            self.entries.pop(entry.name)

    def forget(self, name: str) -> list[AdapterVersion]:
        """Forget ``name`` and its versions; returns those no name holds any more."""
        if name not in self.entries:
            raise _unknown(name)
        del self.entries[name]
        self.pending.pop(name, None)
        self.splits.pop(name, None)
        return [c for held in self.history.pop(name, {}).values() if (c := self._unhold(name, held.content))]

    def forget_version(self, name: str, version: str) -> tuple[AdapterEntry, list[AdapterVersion]]:
        """Forget one older version of ``name`` (not its current one, nor one in its split)."""
        if name not in self.entries:
            raise _unknown(name)
        old = self.history.get(name, {}).get(version)
        if old is None:
            raise unknown_version(name, version, self.version_list(name))
        if self.entries[name] is old:
            raise AdapterError(f"version {version} is the current version of '{name}': roll back to another "
                               f"version first, or unload the adapter", param="version")
        if version in self.splits.get(name, {}):
            raise AdapterError(f"version {version} of '{name}' is in its traffic split: change or delete the "
                               "split first", param="version")
        del self.history[name][version]
        dropped = self._unhold(name, old.content)
        return old, [dropped] if dropped else []

    def forget_unreadable(self, name: str, older: AdapterEntry) -> list[AdapterVersion]:
        """``older`` stopped being ``name``'s current version when new files at its own source loaded: out of
        host memory it can never be read again (its directory holds the new files), so it is forgotten as an
        older version leaving host memory is (forget_older); in a traffic split it stays until the split
        changes."""
        content = older.content
        if content is None or content.weights is not None or content.version in self.splits.get(name, {}) \
                or self.history.get(name, {}).get(content.version) is not older:
            return []
        del self.history[name][content.version]
        return [c for c in [self._unhold(name, content)] if c]

    def forget_older(self, content: AdapterVersion) -> tuple[list[AdapterVersion], list[AdapterEntry]]:
        """``content`` left host memory: the names holding it as an older version forget it. Returns the
        versions no name holds any more and the entries forgotten."""
        dropped, forgotten = [], []
        for name in list(content.names):
            if self.entries[name].content is not content and content.version not in self.splits.get(name, {}):
                forgotten.append(self.history[name].pop(content.version))
                dropped += [c for c in [self._unhold(name, content)] if c]
        return dropped, forgotten

    def _unhold(self, name: str, content: AdapterVersion | None) -> AdapterVersion | None:
        """``name`` no longer holds ``content``. Returns it when no name does any more: retired while requests
        in flight read it (the caller drops it from the host tier either way)."""
        if content is None:
            return None
        content.names.discard(name)
        if content.names:
            return None
        self.versions.pop(content.key, None)
        if content.in_flight > 0:
            self.retired[content.key] = content
        return content

    def rollback(self, name: str, version: str) -> AdapterEntry:
        if name not in self.entries:
            raise _unknown(name, "name")
        entry = self.history.get(name, {}).get(version)
        if entry is None:
            raise unknown_version(name, version, self.version_list(name))
        self.entries[name] = entry
        return entry

    def set_split(self, name: str, split: dict | None) -> dict[str, float] | None:
        if name not in self.entries:
            raise _unknown(name, "name")
        if split is None:
            return self.splits.pop(name, None)
        checked = self.splits[name] = check_split(split, self.version_list(name), name)
        return checked

    def version_list(self, name: str) -> list[str]:
        return list(self.history.get(name, {}))

    def keys_of(self, name: str) -> list[str]:
        """The keys (AdapterVersion.key) of ``name``'s loaded versions."""
        return [e.key for e in self.history.get(name, {}).values()]

    def known(self, key: str) -> bool:
        return key in self.versions or key in self.retired

    def pinned(self, content: AdapterVersion) -> bool:
        """Whether ``content`` must stay in host memory: an operator pinned a name whose current version it is,
        or it is in a name's traffic split (requests are routed to it by weight)."""
        return any(e.pinned and e.content is content for e in map(self.entries.get, content.names) if e) or \
            any(content.version in self.splits.get(name, {}) for name in content.names)

    # ---- loads --------------------------------------------------------------------------------------------
    def bind(self, entry: AdapterEntry, weights: AdapterWeights) -> AdapterVersion:
        """The AdapterVersion ``entry`` read (the existing one when some name already holds that content), now
        bound to ``entry``: its requests in flight count on it from here on."""
        key = weights.content_hash
        content = entry.content or self.versions.get(key) or self.retired.get(key)
        if content is None:
            content = AdapterVersion(bytes.fromhex(key),
                                     {"type": weights.kind, "rank": weights.rank, "size_bytes": weights.nbytes,
                                      "target_modules": target_names(weights.modules)})
        if entry.content is None:
            entry.content = content
            content.in_flight += entry.in_flight
        return content

    def place(self, entry: AdapterEntry, content: AdapterVersion) -> AdapterEntry | None:
        """Enter a freshly read ``content`` in the name's history when ``entry`` is still the name's current
        entry or one of its versions, and return the entry that holds it there; else (unloaded mid-load) keep it
        only for requests in flight (retired) and return None."""
        name, version = entry.name, content.version
        if self.pending.get(name) is entry and name in self.entries:  # a reload has loaded: the name moves now
            del self.pending[name]
            self.entries[name] = entry
        history = self.history.setdefault(name, {}) if name in self.entries else {}
        if not (self.entries.get(name) is entry or history.get(version) is entry):
            if not content.names and content.in_flight > 0:
                self.retired[content.key] = content
            elif not content.names:
                content.weights = None
            return None
        current = self.entries[name]
        if current is not entry and current.version == version:
            return current  # a re-read of a version the name holds under its current entry too
        if current is entry and history.get(version) not in (None, entry):
            same = self.entries[name] = history[version]  # reloaded with the same content: the version stays,
            same.source, same.pinned, same.trusted = entry.source, entry.pinned, entry.trusted  # as reloaded
            same.in_flight, same.hits = same.in_flight + entry.in_flight, same.hits + entry.hits
            entry.in_flight, entry.merged_into = 0, same  # requests bound to entry count (and end) on same
            entry = same
        history[version] = entry
        content.names.add(name)
        self.retired.pop(content.key, None)
        self.versions[content.key] = content
        return entry

    def finished(self, content: AdapterVersion | None) -> bool:
        """The last request on a retired ``content`` finished: it is dropped (True)."""
        if content is None or content.in_flight > 0 or self.retired.get(content.key) is not content:
            return False
        del self.retired[content.key]
        content.weights = None
        return True

    def get(self, key: str) -> AdapterVersion:
        return self.versions.get(key) or self.retired[key]
