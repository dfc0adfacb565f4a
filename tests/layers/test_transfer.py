"""to_device: the plain copy off CUDA; on CUDA the same values through pinned memory."""
from __future__ import annotations

import pytest
import torch

from server.layers.transfer import to_device


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_to_device_keeps_values_and_dtype(device):
    t = torch.arange(10, dtype=torch.int64) * 3
    out = to_device(t, device)
    assert out.device.type == device and out.dtype == t.dtype and out.shape == t.shape
    if device != "meta":
        assert torch.equal(out.cpu(), t)
