"""AdapterSources: where adapters may come from, and where each read must stay.

A source is a directory under an --adapter-root, ``hub:org/name[@revision]`` for an allowed Hub organisation
(downloaded into the Hub adapters cache, HubCache), or an operator's --lora-modules path (trusted). The checks
here (on_demand, check) answer early and clearly; the reads themselves check again on what they open
(AdapterDir, with roots_for), since a path can change between registration and any later read.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from server.adapters.adapter_dir import AdapterDir, root_of
from server.adapters.formats import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.hub_cache import HubCache
from server.config import EngineConfig, valid_adapter_name
from server.errors import AdapterNotAllowedError, UnknownAdapterError

log = logging.getLogger(__name__)

HUB_ID_RE = re.compile(r"^(?:hub:)?([A-Za-z0-9][A-Za-z0-9_.-]{0,95})/([A-Za-z0-9][A-Za-z0-9_.-]{0,95})(?:@([A-Za-z0-9_.-]{1,64}))?\Z")


class AdapterSources:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.roots = [Path(r).resolve() for r in config.adapter_roots]
        for root in self.roots:
            if not root.is_dir():  # a typo: every adapter under it would be 404 without a word
                log.warning("--adapter-root %s is not a directory (yet): nothing under it can be found until it "
                            "is created", root)
        self.hub = HubCache(str(Path(config.adapters_cache).resolve()), config.adapters_cache_bytes,
                            config.max_adapter_bytes)

    def on_demand(self, name: str) -> str | None:
        """The source a request's ``model`` name resolves to (a directory under a root, or an allowed Hub id), or
        None: then the name is no adapter."""
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

    def check(self, source: str) -> str:
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
        inside = False
        for cand in candidates:
            real = Path(os.path.realpath(cand))
            inside = inside or root_of(real, self.roots) is not None
            if root_of(real, self.roots) is not None and real.is_dir():
                with AdapterDir(real, self.roots) as opened:  # symlinked files must not lead out either
                    opened.check(CONFIG_FILE, WEIGHTS_FILE)
                return real
        if inside:  # under a root but absent: 404, as vLLM (only paths inside the roots are told apart)
            raise UnknownAdapterError(f"{source}: no adapter directory there (under --adapter-root "
                                      f"{', '.join(map(str, self.roots))})", param="lora_path")
        raise AdapterNotAllowedError(f"{source}: not a directory under an --adapter-root "
                                     f"({', '.join(map(str, self.roots))})")

    def roots_for(self, source: str, trusted: bool) -> list[Path] | None:
        """What every file read for ``source`` must resolve under: the Hub cache for Hub adapters, nothing for a
        trusted operator path, else the adapter roots."""
        if source.startswith("hub:"):
            return [self.hub.directory]
        return None if trusted else self.roots

    def materialize(self, source: str) -> Path:
        """The local directory of ``source``: itself, or the Hub adapter's snapshot in the cache (fetched)."""
        if not source.startswith("hub:"):
            return Path(source)
        org, repo, revision = HUB_ID_RE.match(source).groups()
        return self.hub.fetch(f"{org}/{repo}", revision)
