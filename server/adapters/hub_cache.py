"""HubCache: the Hub adapters cache (--adapters-cache), bounded by --adapters-cache-bytes.

Before anything is downloaded, the Hub's own file metadata (model_info with files_metadata) says how big the
adapter's two files are: one over --max-adapter-bytes, or without a safetensors file, is refused with 400 and
never fetched. The download is then pinned to the commit that metadata describes (a branch moved meanwhile
cannot swap in a bigger file), after the least recently used repositories were deleted to make room for it.
Each fetch, hit or download, marks its repository used (its directory's mtime), which is the LRU order.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import time
from pathlib import Path

from server.adapters.formats import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE
from server.errors import AdapterError

log = logging.getLogger(__name__)
FILES = (CONFIG_FILE, WEIGHTS_FILE)  # all that is ever downloaded


class HubCache:
    def __init__(self, directory: str, max_bytes: int, max_adapter_bytes: int):
        """directory: where downloads go (huggingface_hub's cache layout, models--org--name/ per repository);
        max_bytes: the cap on its total size; max_adapter_bytes: the largest weights file accepted."""
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_adapter_bytes = max_adapter_bytes

    def fetch(self, repo_id: str, revision: str | None) -> Path:
        """The local snapshot directory of ``repo_id`` at ``revision``, downloaded if need be."""
        import huggingface_hub as hub

        shown = f"hub:{repo_id}" + (f"@{revision}" if revision else "")
        try:
            info = hub.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
        except Exception as e:  # noqa: BLE001 - not found, private, gated, or the Hub unreachable
            raise AdapterError(f"{shown}: cannot read its file list from the Hub ({type(e).__name__}: {e}); "
                               "check the id and revision, or retry if the Hub is unreachable") from None
        sizes = self._sizes(shown, {s.rfilename: s.size for s in info.siblings or ()})
        repo_dir = self.directory / hub.file_download.repo_folder_name(repo_id=repo_id, repo_type="model")
        path = repo_dir / "snapshots" / info.sha
        missing = sum(size for name, size in sizes.items() if not (path / name).is_file())
        if missing:  # else a hit: this very commit's files are here
            self._make_room(missing, shown)
            path = Path(hub.snapshot_download(repo_id, revision=info.sha, cache_dir=str(self.directory),
                                              allow_patterns=list(FILES)))
        now = time.time_ns()  # explicit: "now" by the file system's clock can be coarser than a burst of fetches
        os.utime(path.parents[1], ns=(now, now))  # <repo>/snapshots/<commit>: now the most recently used
        return path

    def _sizes(self, shown: str, listed: dict[str, int | None]) -> dict[str, int]:
        """The sizes of FILES as the Hub lists them, each within its limit (AdapterError, 400, otherwise)."""
        if WEIGHTS_FILE not in listed:
            raise AdapterError(f"{shown}: has no {WEIGHTS_FILE} on the Hub (only safetensors adapters are served; "
                               "pickled .bin weights are never loaded); nothing was downloaded")
        limits = {CONFIG_FILE: (MAX_CONFIG_BYTES, "the adapter config limit"),
                  WEIGHTS_FILE: (self.max_adapter_bytes, "--max-adapter-bytes")}
        sizes = {name: listed[name] for name in FILES if name in listed}  # a missing config: the reader says so
        for name, size in sizes.items():
            limit, what = limits[name]
            if size is None:
                raise AdapterError(f"{shown}: the Hub did not report the size of {name}; nothing was downloaded")
            if size > limit:
                raise AdapterError(f"{shown}: {name} is {size} bytes on the Hub, over {what} ({limit} bytes); "
                                   "nothing was downloaded")
        if sum(sizes.values()) > self.max_bytes:
            raise AdapterError(f"{shown}: {sum(sizes.values())} bytes is more than the whole Hub adapters cache "
                               f"(--adapters-cache-bytes {self.max_bytes}); raise it to load this adapter")
        return sizes

    def _make_room(self, need: int, shown: str) -> None:
        """Delete the least recently used repositories until ``need`` more bytes fit under the cap."""
        repos = sorted((p.stat().st_mtime_ns, p) for p in self.directory.glob("models--*") if p.is_dir())
        sizes = {p: _disk_bytes(p) for _, p in repos}
        total = sum(sizes.values())
        for _, repo in repos:
            if total + need <= self.max_bytes:
                break
            shutil.rmtree(repo, ignore_errors=True)
            shutil.rmtree(self.directory / ".locks" / repo.name, ignore_errors=True)
            total -= sizes[repo]
            log.info("adapters cache: removed %s (%d bytes, least recently used) to fit %s", repo.name,
                     sizes[repo], shown)

    def size(self) -> int:
        """Bytes the cache holds now."""
        return sum(_disk_bytes(p) for p in self.directory.glob("models--*") if p.is_dir())


def _disk_bytes(directory: Path) -> int:
    """Bytes of the regular files under ``directory`` (symlinks, such as the Hub's snapshot links, not followed)."""
    total = 0
    for parent, _, files in os.walk(directory):
        for name in files:
            st = os.lstat(os.path.join(parent, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total
