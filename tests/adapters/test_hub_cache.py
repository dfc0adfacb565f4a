"""server.adapters.hub_cache with a fake Hub (no network): sizes are checked from the Hub's file metadata before
anything is downloaded (over --max-adapter-bytes, no safetensors, over the whole cache: 400, nothing fetched),
the download is pinned to the commit the metadata described, and the cache stays under --adapters-cache-bytes
by deleting the least recently used repositories. Through the AdapterStore, a Hub adapter loads from the cache
(its snapshot symlinks into the cache's blobs are inside the cache root)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub.hf_api import RepoSibling

from server.adapters.formats import CONFIG_FILE, WEIGHTS_FILE
from server.adapters.hub_cache import HubCache
from server.errors import AdapterError


class FakeHub:
    """repos: repo id -> {file name: bytes}; ``claimed`` overrides the sizes the metadata reports."""

    def __init__(self, repos: dict[str, dict[str, bytes]], claimed: dict[str, dict[str, int | None]] | None = None):
        self.repos, self.claimed = repos, claimed or {}
        self.downloads: list[tuple[str, str]] = []

    def sha(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def model_info(self, repo_id, revision=None, files_metadata=False):
        assert files_metadata, "sizes must come from the file metadata"
        sizes = {name: len(data) for name, data in self.repos[repo_id].items()} | self.claimed.get(repo_id, {})
        return SimpleNamespace(sha=self.sha(repo_id), siblings=[RepoSibling(rfilename=n, size=s)
                                                                 for n, s in sizes.items()])

    def snapshot_download(self, repo_id, revision=None, cache_dir=None, allow_patterns=None):
        """huggingface_hub's layout: blobs/<hash> and snapshots/<commit>/<file> -> ../../blobs/<hash>."""
        self.downloads.append((repo_id, revision))
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "blobs").mkdir(exist_ok=True)
        for name, data in self.repos[repo_id].items():
            if name in allow_patterns:
                blob = hashlib.sha256(data).hexdigest()
                (repo / "blobs" / blob).write_bytes(data)
                if not (snapshot / name).exists():
                    os.symlink(Path("..", "..", "blobs", blob), snapshot / name)
        return str(snapshot)


@pytest.fixture
def fake_hub(monkeypatch, lora_dir):
    adapter = {CONFIG_FILE: (lora_dir / CONFIG_FILE).read_bytes(), WEIGHTS_FILE: (lora_dir / WEIGHTS_FILE).read_bytes()}
    hub = FakeHub({f"org/a{i}": adapter for i in range(4)} |
                  {"org/pickle": {CONFIG_FILE: adapter[CONFIG_FILE], "adapter_model.bin": b"x" * 10},
                   "org/huge": adapter})
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **k: hub.model_info(*a, **k))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    hub.adapter_bytes = sum(map(len, adapter.values()))
    return hub


def test_sizes_from_metadata_refuse_before_downloading(fake_hub, tmp_path):
    fake_hub.claimed["org/huge"] = {WEIGHTS_FILE: 2 << 30}
    tmp_path = tmp_path / "cache"
    cache = HubCache(str(tmp_path), max_bytes=1 << 30, max_adapter_bytes=1 << 20)
    with pytest.raises(AdapterError, match=r"hub:org/huge@main: adapter_model\.safetensors is 2147483648 bytes on "
                                           r"the Hub, over --max-adapter-bytes \(1048576 bytes\); nothing was downloaded"):
        cache.fetch("org/huge", "main")
    with pytest.raises(AdapterError, match=r"hub:org/pickle: has no adapter_model\.safetensors on the Hub"):
        cache.fetch("org/pickle", None)
    fake_hub.claimed["org/a0"] = {WEIGHTS_FILE: None}
    with pytest.raises(AdapterError, match="did not report the size of adapter_model.safetensors"):
        cache.fetch("org/a0", None)
    small = HubCache(str(tmp_path), max_bytes=fake_hub.adapter_bytes - 1, max_adapter_bytes=1 << 20)
    with pytest.raises(AdapterError, match=r"more than the whole Hub adapters cache \(--adapters-cache-bytes"):
        small.fetch("org/a1", None)
    assert fake_hub.downloads == [] and not tmp_path.exists()


def test_download_is_pinned_to_the_checked_commit(fake_hub, tmp_path):
    tmp_path = tmp_path / "cache"
    path = HubCache(str(tmp_path), 1 << 30, 1 << 20).fetch("org/a0", "main")
    assert fake_hub.downloads == [("org/a0", fake_hub.sha("org/a0"))]
    assert path == tmp_path / "models--org--a0" / "snapshots" / fake_hub.sha("org/a0")
    assert (path / WEIGHTS_FILE).read_bytes() == fake_hub.repos["org/a0"][WEIGHTS_FILE]


def test_cache_stays_under_its_cap_least_recently_used_first(fake_hub, tmp_path):
    tmp_path = tmp_path / "cache"
    cache = HubCache(str(tmp_path), max_bytes=int(2.5 * fake_hub.adapter_bytes), max_adapter_bytes=1 << 20)
    cache.fetch("org/a0", None)
    cache.fetch("org/a1", None)
    cache.fetch("org/a0", None)  # a hit: nothing downloaded, but a0 is now the most recently used
    assert [d[0] for d in fake_hub.downloads] == ["org/a0", "org/a1"]
    cache.fetch("org/a2", None)  # room for two: a1 (least recently used) goes
    repos = sorted(p.name for p in tmp_path.glob("models--*"))
    assert repos == ["models--org--a0", "models--org--a2"]
    assert cache.size() <= cache.max_bytes


def test_store_loads_a_hub_adapter_from_the_cache(fake_hub, base_targets, tmp_path):
    from server.adapters.store import AdapterStore
    from server.config import EngineConfig

    cfg = EngineConfig(model="tiny", max_loras=1, max_lora_rank=8, allow_hub_adapters=True, hub_adapter_orgs=["org"],
                       adapters_cache=str(tmp_path / "cache"), adapters_cache_bytes=1 << 30)
    store = AdapterStore(cfg, base_targets, cfg.model)
    try:
        entry = store.resolve("org/a3")
        assert entry.source == "hub:org/a3"
        assert store.ensure_host(entry).result(timeout=60).weights.rank == 4
        assert fake_hub.downloads == [("org/a3", fake_hub.sha("org/a3"))]
    finally:
        store.close()
