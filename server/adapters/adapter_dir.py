"""AdapterDir: an adapter directory opened once, with its files opened relative to that descriptor, each
checked to lie under the allowed roots *after* it was opened.

Why after: a check of a path followed by an open of the same path can be split by a swap (the directory
replaced by a symlink out of the root between the two), so every read would trust a stale check. Here what is
checked is the very object that is read: the kernel's own path of each open descriptor (/proc/self/fd), with
every symlink, in the directory's path or inside it, already resolved.

roots: the directories everything read must lie under (the --adapter-roots, or the Hub adapters cache); None
for an operator-given path (--lora-modules), which is trusted as configured.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterable

from server.errors import AdapterNotAllowedError

# where the kernel shows each open descriptor's resolved path; without it (not Linux) the path is checked just
# before opening and no symlink is followed at the last step (O_NOFOLLOW), which narrows the race to parents
_FD_LINKS = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else None
_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang the open
_NOFOLLOW = 0 if _FD_LINKS else getattr(os, "O_NOFOLLOW", 0)


def root_of(real: Path, roots: Iterable[Path]) -> Path | None:
    """The root that ``real`` (a resolved path) is or lies under, or None."""
    return next((r for r in roots if real == r or r in real.parents), None)


class AdapterDir:
    """``path`` opened as a directory; raises OSError when it cannot be (missing, not a directory),
    AdapterNotAllowedError (403) when it resolves outside every root. Use as a context manager."""

    def __init__(self, path: str | Path, roots: Iterable[str | Path] | None = None):
        self.path = Path(path)
        self.roots = None if roots is None else [Path(r) for r in roots]
        if _FD_LINKS is None:
            self._check(Path(os.path.realpath(self.path)), self.path)
        self.fd = os.open(self.path, _READ | os.O_DIRECTORY | _NOFOLLOW)
        try:
            self._check_fd(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            raise

    def open(self, name: str) -> BinaryIO | None:
        """``name`` in this directory opened for reading (binary), or None when it is absent or not a regular
        file. Raises AdapterNotAllowedError when the file opened resolves outside every root."""
        try:
            fd = os.open(name, _READ | _NOFOLLOW, dir_fd=self.fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return None
            self._check_fd(fd, self.path / name)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def check(self, *names: str) -> None:
        """Each of ``names`` that exists must resolve under a root (opened and closed again, nothing read)."""
        for name in names:
            f = self.open(name)
            if f is not None:
                f.close()

    def exists(self, name: str) -> bool:
        """Whether ``name`` is in this directory (any kind of entry, a symlink not followed)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> AdapterDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_fd(self, fd: int, shown: Path) -> None:
        if self.roots is not None and _FD_LINKS is not None:
            self._check(Path(os.readlink(f"{_FD_LINKS}/{fd}")), shown)

    def _check(self, real: Path, shown: Path) -> None:
        if self.roots is not None and root_of(real, self.roots) is None:
            raise AdapterNotAllowedError(
                f"{shown}: resolves outside the adapter roots ({', '.join(map(str, self.roots))}); adapters are "
                "read only from under them (a symlink out of a root is refused, also when it appears after the "
                "adapter was first loaded)")
