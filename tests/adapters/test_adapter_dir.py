"""server.adapters.adapter_dir: what is checked is what is read. The directory and each file are checked to
resolve under the roots once open, so a swap after the check cannot redirect the read; symlinks inside a root
are followed, symlinks out of it refused; a FIFO never hangs the open; roots=None (an operator path) reads as is."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from server.adapters.adapter_dir import AdapterDir, root_of
from server.adapters.formats import CONFIG_FILE, WEIGHTS_FILE, load_adapter_dir
from server.errors import AdapterNotAllowedError


@pytest.fixture
def tree(lora_dir, tmp_path) -> dict[str, Path]:
    """root/good (a real adapter), outside/evil (another copy, whose config names it), root/inner-link ->
    root/good (a symlink that stays inside)."""
    root, outside = (tmp_path / "root").resolve(), (tmp_path / "outside").resolve()
    shutil.copytree(lora_dir, root / "good")
    shutil.copytree(lora_dir, outside / "evil")
    (outside / "evil" / CONFIG_FILE).write_text((outside / "evil" / CONFIG_FILE).read_text().replace("{", '{"evil": 1, ', 1))
    os.symlink(root / "good", root / "inner-link")
    return {"root": root, "outside": outside}


def read_config(opened: AdapterDir) -> bytes:
    with opened.open(CONFIG_FILE) as f:
        return f.read()


def test_files_under_the_root_read_and_symlinks_inside_it_are_followed(tree):
    root = tree["root"]
    for name in ("good", "inner-link"):
        with AdapterDir(root / name, [root]) as opened:
            assert read_config(opened) == (root / "good" / CONFIG_FILE).read_bytes()
            assert opened.open("absent.json") is None and not opened.exists("absent.json")
    assert root_of(root / "good", [root]) == root and root_of(tree["outside"], [root]) is None


def test_directory_symlinked_out_of_the_root_is_refused(tree):
    root = tree["root"]
    os.symlink(tree["outside"] / "evil", root / "escape")
    with pytest.raises(AdapterNotAllowedError, match=r"escape: resolves outside the adapter roots") as info:
        AdapterDir(root / "escape", [root])
    assert info.value.status_code == 403


def test_file_symlinked_out_of_the_root_is_refused(tree):
    root = tree["root"]
    (root / "good" / WEIGHTS_FILE).unlink()
    os.symlink(tree["outside"] / "evil" / WEIGHTS_FILE, root / "good" / WEIGHTS_FILE)
    with AdapterDir(root / "good", [root]) as opened:
        assert read_config(opened)  # the real file beside it is fine
        with pytest.raises(AdapterNotAllowedError, match=r"adapter_model\.safetensors: resolves outside"):
            opened.open(WEIGHTS_FILE)
        with pytest.raises(AdapterNotAllowedError):
            opened.check(CONFIG_FILE, WEIGHTS_FILE)
    with pytest.raises(AdapterNotAllowedError, match=r"adapter_model\.safetensors: resolves outside"):
        load_adapter_dir(root / "good", "x", roots=[str(root)])


def test_a_swap_after_the_directory_was_opened_cannot_redirect_the_read(tree):
    """The directory is replaced by a symlink out of the root after it was opened (and checked): the files are
    still read from the directory that was checked, never from where the symlink now points."""
    root = tree["root"]
    original = (root / "good" / CONFIG_FILE).read_bytes()
    with AdapterDir(root / "good", [root]) as opened:
        (root / "good").rename(root / "moved-away")
        os.symlink(tree["outside"] / "evil", root / "good")
        assert read_config(opened) == original and b"evil" not in original
    with pytest.raises(AdapterNotAllowedError):  # opened afresh, the swapped path is refused
        AdapterDir(root / "good", [root])


def test_fifo_is_no_file_and_never_blocks(tree):
    root = tree["root"]
    (root / "good" / WEIGHTS_FILE).unlink()
    os.mkfifo(root / "good" / WEIGHTS_FILE)  # an open without O_NONBLOCK would wait for a writer forever
    with AdapterDir(root / "good", [root]) as opened:
        assert opened.open(WEIGHTS_FILE) is None and opened.exists(WEIGHTS_FILE)


def test_trusted_paths_are_read_as_configured(tree):
    os.symlink(tree["outside"] / "evil", tree["root"] / "escape")
    with AdapterDir(tree["root"] / "escape", None) as opened:
        assert b"evil" in read_config(opened)


def test_missing_directory_or_a_file_is_an_os_error(tree):
    with pytest.raises(FileNotFoundError):
        AdapterDir(tree["root"] / "nope", [tree["root"]])
    with pytest.raises(NotADirectoryError):
        AdapterDir(tree["root"] / "good" / CONFIG_FILE, [tree["root"]])
