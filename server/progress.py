"""Progress bars for long work (model download and GGUF conversion, Hub adapter downloads, `swapserve train`,
`make bench`): drawn on an interactive terminal, off otherwise. Redrawn bars in a log file, `docker logs` or CI
output are noise, so when stderr is not a TTY every tqdm bar is off: ours, and those the libraries draw
(huggingface_hub downloads, transformers' GGUF dequantization and weight loading, Trainer): tqdm's default for
``disable`` becomes True in this process (a bar that passes ``disable`` itself still decides), TQDM_DISABLE=1
does the same for child processes (tqdm reads it at import), and the libraries' own switches are set.

Entry points (the CLI, bench) call configure() once; code that runs long work wraps it in bar().
"""
from __future__ import annotations

import functools
import os
import sys

from tqdm import std
from tqdm.auto import tqdm

_TQDM_INIT = std.tqdm.__init__


def bars_enabled(stream=None) -> bool:
    """Whether ``stream`` (stderr, where tqdm draws) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def configure(enabled: bool | None = None) -> bool:
    """Turn every progress bar in this process on or off (default: bars_enabled()); returns the choice."""
    enabled = bars_enabled() if enabled is None else enabled
    if enabled:
        os.environ.pop("TQDM_DISABLE", None)
        std.tqdm.__init__ = _TQDM_INIT
    else:
        os.environ["TQDM_DISABLE"] = "1"
        std.tqdm.__init__ = functools.partialmethod(_TQDM_INIT, disable=True)
    try:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if enabled else disable_progress_bars)()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    except ImportError:
        pass
    return enabled


def bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "it") -> tqdm:
    """A tqdm bar that is off unless stderr is a terminal (whatever configure() was told)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not bars_enabled(), dynamic_ncols=True)
