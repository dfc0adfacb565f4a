"""Session fixtures: a tiny random Llama with an offline-built tokenizer, and PEFT adapters of every kind.
Helpers live in support.py (a unique module name: several conftest.py files exist under tests/)."""
from __future__ import annotations

from pathlib import Path

import pytest

from support import ADAPTER_KINDS, build_tiny_llama, build_tokenizer, make_adapter


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out)
    build_tiny_llama(out, len(tok))
    return out


@pytest.fixture(scope="session")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One saved PEFT adapter per kind, plus a second LoRA ('lora2'), keyed by name."""
    root = tmp_path_factory.mktemp("adapters")
    made = {kind: make_adapter(tiny_model_dir, kind, root / kind, seed=i + 1) for i, kind in enumerate(ADAPTER_KINDS)}
    made["lora2"] = make_adapter(tiny_model_dir, "lora", root / "lora2", seed=99)
    return made


