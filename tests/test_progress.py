"""server.progress: bars on a terminal only; configure() switches ours, tqdm's default and the libraries'."""
from __future__ import annotations

import io
import os

import pytest
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from transformers.utils import logging as hf_logging
from tqdm import std
from tqdm.auto import tqdm

from server import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore(monkeypatch):
    """Leave the process's progress switches as they were."""
    hub_off, hf_on = are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    yield monkeypatch
    std.tqdm.__init__ = progress._TQDM_INIT
    (disable_progress_bars if hub_off else enable_progress_bars)()
    (hf_logging.enable_progress_bar if hf_on else hf_logging.disable_progress_bar)()


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    assert progress.bars_enabled(Terminal()) and not progress.bars_enabled(io.StringIO())
    monkeypatch.setenv("TERM", "dumb")
    assert not progress.bars_enabled(Terminal())


def test_configure_switches_tqdm_and_the_libraries(restore):
    assert progress.configure(False) is False
    assert os.environ["TQDM_DISABLE"] == "1" and tqdm(range(3)).disable  # a library's own bar is off too
    assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()
    assert progress.configure(True) is True
    assert "TQDM_DISABLE" not in os.environ and not tqdm(range(3), file=Terminal()).disable
    assert not are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()


def test_our_bars_follow_stderr(restore):
    restore.setattr("sys.stderr", io.StringIO())
    assert progress.bar(total=3).disable
    restore.setattr("sys.stderr", Terminal())
    restore.setenv("TERM", "xterm")
    with progress.bar(total=3, desc="work") as bar:
        assert not bar.disable
        bar.update(3)
