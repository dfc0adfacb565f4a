"""Adapter versions: an adapter's identity is its content, not its name.

``version`` = the first 12 hex digits of AdapterWeights.content_hash, the SHA-256 over the adapter's config
(canonical JSON: sorted keys, no spaces) and its safetensors (header and bytes). The same content under two
names is one version, held once in host memory and in at most one device slot; a name reloaded with other
content gets a new version, and the old one stays addressable as ``name@version``.

Canary: a traffic split {version: weight} (weights summing to 100) sends each request for a name to one of its
versions. ``pick_version`` is the routing rule: with a user id the choice is a deterministic function of
(name, user), so a user stays on one version while the split stands; without one it is drawn per request.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field

from server.adapters.weights import AdapterWeights
from server.errors import InvalidRequestError, UnknownAdapterError

VERSION_CHARS = 12
VERSION_RE = re.compile(r"^[0-9a-f]{12}\Z")
SPLIT_TOTAL = 100.0


def version_of(content_hash: str) -> str:
    """The version of an adapter whose AdapterWeights.content_hash (hex) is ``content_hash``."""
    return content_hash[:VERSION_CHARS]


def split_pin(model: str) -> tuple[str, str | None]:
    """``name@version`` -> (name, version); anything else (no '@', or a suffix that is not 12 lowercase hex
    digits, such as a Hub id's ``@revision``) -> (model, None)."""
    name, at, version = model.rpartition("@")
    if at and name and VERSION_RE.match(version):
        return name, version
    return model, None


@dataclass(eq=False)
class AdapterVersion:
    """One adapter content: the unit of the host tier and of device slots (keyed by ``key``, the whole hash).

    names: the adapter names whose versions include this one; with none left it is forgotten (or, while requests
    still read it, kept as "retired" until the last one finishes).
    in_flight: requests reading it, under any name: while > 0 it is never evicted from host memory.
    """

    content_hash: bytes  # the full SHA-256: the identity (host tier, device slots, prefix-cache blocks)
    info: dict  # type, rank, size_bytes
    weights: AdapterWeights | None = None
    names: set[str] = field(default_factory=set)
    in_flight: int = 0
    last_used: float | None = None

    @property
    def key(self) -> str:
        """What the host tier and the device slots are keyed by: the whole hash (hex), never the 12-digit version,
        so nobody can craft an adapter that shares another's slot by matching 48 bits."""
        return self.content_hash.hex()

    @property
    def version(self) -> str:
        """What users see and pin: unique among a name's versions, not a global key."""
        return version_of(self.content_hash.hex())


def check_split(split: dict, known: list[str], name: str) -> dict[str, float]:
    """A traffic split as given (version -> weight) checked against ``known`` (the name's versions):
    InvalidRequestError (400) for an unknown version, a negative or non-finite weight, or weights that do not
    sum to 100. Returns it with float weights, in the order given."""
    if not isinstance(split, dict) or not split:
        raise InvalidRequestError("'split' must map one or more versions to weights summing to 100", param="split")
    out = {}
    for version, weight in split.items():
        if version not in known:
            raise InvalidRequestError(f"adapter {name!r} has no version {version!r} (its versions: "
                                      f"{', '.join(known) or 'none'})", param="split")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            raise InvalidRequestError(f"split weight of {version!r} must be a finite number >= 0, got {weight!r}",
                                      param="split")
        out[version] = float(weight)
    if abs(sum(out.values()) - SPLIT_TOTAL) > 1e-6:
        raise InvalidRequestError(f"split weights must sum to 100, got {sum(out.values()):g}", param="split")
    return out


def pick_version(split: dict[str, float], name: str, user: str | None, rng: random.Random | None = None) -> str:
    """The version of ``split`` a request for ``name`` goes to: a point in [0, 100) from SHA-256(name, user) when
    ``user`` is given (sticky: the same user always lands on the same point), else drawn from ``rng``; the
    versions own consecutive ranges of their weights, in the split's order."""
    if user is not None:
        digest = hashlib.sha256(f"{name}\0{user}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2 ** 64 * SPLIT_TOTAL
    else:
        point = (rng or random).random() * SPLIT_TOTAL
    top = 0.0
    for version, weight in split.items():
        top += weight
        if point < top:
            return version
    return next(v for v, w in reversed(split.items()) if w > 0)  # rounding at the very top


def unknown_version(name: str, version: str, known: list[str]) -> UnknownAdapterError:
    return UnknownAdapterError(f"The lora adapter '{name}' has no version '{version}' (its versions: "
                               f"{', '.join(known) or 'none'}).", param="model")
