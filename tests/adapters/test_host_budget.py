"""server.adapters.host_budget: what a load reserves before reading is the host bytes it will hold once packed
(exact for LoRA, rsLoRA, IA3 and AdaLoRA files, float32 or float16), and the reservation settles on the true size."""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import ADAPTER_KINDS

from server.adapters.formats import WEIGHTS_FILE, check_safetensors_header, load_adapter_dir
from server.adapters.host_budget import HostBudget, packed_bytes
from server.errors import AdapterError


def header_of(directory):
    with open(directory / WEIGHTS_FILE, "rb") as f:
        return check_safetensors_header(f, directory / WEIGHTS_FILE, 1 << 30)[0]


@pytest.mark.parametrize("kind", [k for k in ADAPTER_KINDS if k not in ("dora", "lora_pattern")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_estimate_is_the_packed_size(kind, dtype, adapters, tmp_path):
    directory = tmp_path / kind
    directory.mkdir()
    (directory / "adapter_config.json").write_bytes((adapters[kind] / "adapter_config.json").read_bytes())
    tensors = {k: t.to(dtype) for k, t in load_file(str(adapters[kind] / WEIGHTS_FILE)).items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    weights = load_adapter_dir(directory, kind)
    weights.prepare_slots(None)
    assert packed_bytes(header_of(directory)) == weights.nbytes


def test_settle_gives_back_or_reserves_the_difference():
    budget = HostBudget(max_bytes=100, wait_s=0, lock=threading.RLock())
    held = lambda need: 0  # noqa: E731 - nothing else held
    budget.reserve(60, budget.deadline(), held, "a")
    assert budget.settle(60, 40, budget.deadline(), held, "a") == 40 and budget.reserved == 40
    assert budget.settle(40, 90, budget.deadline(), held, "a") == 90 and budget.reserved == 90
    with pytest.raises(AdapterError, match="more than the whole host adapter budget"):
        budget.settle(90, 101, budget.deadline(), held, "a")
    assert budget.reserved == 90  # the caller gives its reservation back on failure
