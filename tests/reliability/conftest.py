"""Reliability fixtures: hostile adapter roots built at test time, and helpers to check a server still serves.

Servers come from tests/api/conftest.py's live_server (real uvicorn on a loopback port over a real AsyncEngine
with the tiny random Llama); each test module starts the one it needs, configured for what it attacks.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from pathlib import Path

import pytest

from support import randomize_adapter

BASE = "tiny-llama"
NORMAL = {"model": BASE, "prompt": "hello world", "max_tokens": 4, "temperature": 0}


def still_serves(http, expected_text: str | None = None) -> None:
    """A normal greedy request answers 200 (with the same text as before the attack, when given)."""
    r = http.post("/v1/completions", json=NORMAL)
    assert r.status_code == 200, r.text
    if expected_text is not None:
        assert r.json()["choices"][0]["text"] == expected_text
    assert http.get("/health").status_code == 200


def error_message(response) -> str:
    """The message of an OpenAI-shaped or TGI-shaped error body."""
    body = response.json()
    error = body["error"]
    return error["message"] if isinstance(error, dict) else error


class Payload:
    """Unpickling this creates ``path``: proof of code execution if the file ever appears."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def live_pickle(marker: Path, control: Path) -> bytes:
    """Pickle bytes that create ``marker`` when unpickled; proven live on ``control`` first."""
    pickle.loads(pickle.dumps(Payload(control))).close()
    assert control.exists(), "the payload must be live for its absence to mean anything"
    control.unlink()
    return pickle.dumps(Payload(marker))


def safetensors_header(obj: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def make_lora(model_dir: Path, out: Path, r: int, seed: int, targets=("q_proj", "v_proj")) -> Path:
    """A PEFT LoRA of rank ``r`` with random non-zero weights, saved to ``out``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    randomize_adapter(model, seed)
    model.save_pretrained(out)
    return out


def rewrite_tensors(directory: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    save_file(edit(load_file(str(path))), str(path))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")
