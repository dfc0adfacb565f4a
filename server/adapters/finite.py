"""check_finite: every value an adapter puts in a device slot must be finite there, in the serving dtype.

Why at load: one NaN or Inf in a resident slot can reach other requests' rows of the same step (issue 14), and
an Inf turns into NaN downstream; so such an adapter is refused with 400, before it is ever resident. Finite in
the file is not enough: a slot holds B with its scaling folded in (and DoRA's d), cast to the serving dtype,
whose largest finite value is 65504 for float16 (float32's ~3.4e38 for bfloat16 and float32).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from server.adapters.formats import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, AdapterFormatError
from server.adapters.weights import AdapterWeights
from server.layers.host_weights import ModuleWeights


def check_finite(weights: AdapterWeights, dtype: torch.dtype = torch.float32) -> None:
    """Refuse (AdapterFormatError, 400, naming the file, the tensor and the limit) an adapter any of whose
    slot-bound values is NaN or Inf, or beyond ``dtype``'s finite range once scaled as the slot holds it.

    Checked per module: A (A times E for AdaLoRA), B times its scaling (the slot's B, with DoRA's d folded in,
    once its factors exist), DoRA's magnitude, d and bias shift, IA3's vector.
    """
    limit = torch.finfo(dtype).max
    where = Path(weights.path) / WEIGHTS_FILE
    for module, mw in weights.modules.items():
        for name, tensor, factor in _served(module, mw, weights.peft_type == "ADALORA"):
            problem = _problem(_peak(tensor), factor, limit, dtype)
            if problem:
                raise AdapterFormatError(f"{where}: tensor {name!r} {problem}")


def _problem(peak: float, factor: float, limit: float, dtype: torch.dtype) -> str | None:
    """Why a tensor whose largest magnitude is ``peak``, served times ``factor``, cannot be served; None if
    it can."""
    if not math.isfinite(peak):
        return ("holds NaN or Inf; the adapter cannot be served (NaN or Inf in a slot would corrupt other "
                "requests in the batch): fix or re-export it")
    if not math.isfinite(factor):
        return f"has a non-finite scaling ({factor}): check lora_alpha and r in {CONFIG_FILE}"
    if peak * abs(factor) <= limit:
        return None
    name = str(dtype).removeprefix("torch.")
    scaled = f"times its scaling {factor:g} " if factor != 1 else ""
    return (f"{scaled}reaches {peak * abs(factor):.5g}, beyond {name}'s largest "
            f"finite value {limit:.5g}; in the {name} adapter slot it would be Inf: serve with --dtype float32 "
            "(or bfloat16), or rescale the adapter")


def _served(module: str, mw: ModuleWeights, adalora: bool) -> Iterator[tuple[str, torch.Tensor, float]]:
    """(tensor name, tensor, factor the slot applies to it) of each slot-bound tensor of one module."""
    key = KEY_PREFIX + module
    if mw.a is not None:
        yield f"{key}.lora_A.weight" + (f" x {key}.lora_E" if adalora else ""), mw.a, 1.0
    if mw.slot_b is not None:
        yield f"{key}.lora_B.weight (scaled, as in the slot)", mw.slot_b, 1.0
    elif mw.b is not None:
        yield f"{key}.lora_B.weight", mw.b, mw.scaling
    if mw.magnitude is not None:
        yield f"{key}.lora_magnitude_vector", mw.magnitude, 1.0
    if mw.dora_scale is not None:
        yield f"{key} DoRA scale m / ||W + s*B@A||", mw.dora_scale, 1.0
    if mw.dora_shift is not None:
        yield f"{key} DoRA bias shift", mw.dora_shift, 1.0
    if mw.ia3 is not None:
        yield f"{key}.ia3_l.weight", mw.ia3, 1.0


def _peak(t: torch.Tensor) -> float:
    """The largest magnitude in ``t``: NaN when it holds a NaN, Inf when an Inf."""
    if t.numel() == 0:
        return 0.0
    if t.element_size() == 1:  # float8: no abs/amax kernels
        t = t.float()
    return t.abs().amax().item()
