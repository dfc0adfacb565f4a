"""The base model's float32 linear layers on CPU through oneDNN, with weights packed once at start-up.

Why: torch's default CPU sgemm is MKL's, and on AMD EPYC MKL takes a generic code path. Measured here (one
core, SmolLM2 shapes, 32 rows, the decode step of a 32-stream batch) F.linear ran at 80-85 GFLOP/s and the
49152-row head at 41-54; oneDNN's matmul (torch's own copy, the one Inductor's CPU backend calls) ran the same
products at 150-200 GFLOP/s on a weight packed in its blocked layout: 2.3x on the layers, 3.2x on the head,
and a whole 16-adapter decode step fell from ~183 to ~100 ms. vLLM's CPU backend likewise runs its
unquantized linears through oneDNN with packed weights.

What changes: a plain float32 ``nn.Linear`` becomes a ``PackedLinear`` holding its weight once, in oneDNN's
layout (the dense copy is dropped, so memory does not grow; ``dense()`` gives it back, exactly, for the
DoRA factors). A weight shared with another module (a head tied to the embedding) cannot be dropped: it stays
dense for the embedding's lookups, and the head computes on a packed copy of it when that copy is at most
TIED_COPY_MAX_BYTES (SmolLM2's 49152-row head, 113 MiB: 16 and 32 rows took 38 and 44 ms on one core instead
of 52 and 60 with oneDNN reordering the dense weight per call, ~7% of a 32-row decode step), else oneDNN
reorders the dense weight per call (still 1.8-2.4x F.linear). Results are F.linear's up to float32 summation
order (~1e-6 relative), which the PEFT tests' tolerances already cover.
Inference only (the packed op has no backward); ``swapserve train`` never uses it.
"""
from __future__ import annotations

import platform

import torch
from torch import nn

# oneDNN picks its blocking for this many rows; 32 (a full decode batch) also served 1..1024 rows within a few
# percent of the best per-size packing here, except single rows (~25% behind MKL on the small k/v shapes)
PACK_ROWS = 32


def available() -> bool:
    """torch was built with oneDNN and has its packed-linear ops (every x86 wheel does)."""
    mkldnn = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight"))


# A oneDNN call costs ~10 us more than F.linear's (dispatch through torch.ops, primitive lookup), so a weight
# must be this large (in x out) before packing pays: measured on one core, 256x256 already ran 1.6x faster at
# 32 rows (and 0.4x at one), 64x128 0.6x even at 32 rows. Real models' smallest linears (SmolLM2's 576x192
# k/v projections) are above it; test-sized toy models are below and stay on F.linear.
MIN_PACK_ELEMENTS = 1 << 16
# A tied head's packed copy costs its bytes again (the embedding keeps the dense weight): taken up to this size
# (SmolLM2's head: 113 MiB; a 1B model's 128k-row head, 1 GiB, is not copied)
TIED_COPY_MAX_BYTES = 256 << 20


def plan(choice: str, device: torch.device, dtype: torch.dtype) -> int | None:
    """--cpu-gemm ``choice`` for this model: the smallest weight (in x out elements) to pack, or None for no
    packing. onednn packs every float32 linear (or refuses where it cannot), torch none, auto those of at least
    MIN_PACK_ELEMENTS for float32 on an x86 CPU (elsewhere torch's own dispatch is the better-tested path)."""
    usable = device.type == "cpu" and dtype == torch.float32 and available()
    if choice == "onednn" and not usable:
        raise ValueError(f"--cpu-gemm onednn needs a float32 model on CPU and torch built with oneDNN (here: "
                         f"{dtype} on {device}, oneDNN {'present' if available() else 'missing'}); "
                         "use --cpu-gemm auto or torch")
    if choice == "onednn":
        return 0
    if choice == "torch" or not usable or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return MIN_PACK_ELEMENTS


class PackedLinear(nn.Module):
    """A float32 CPU ``nn.Linear`` for inference, its product computed by oneDNN (see the module docstring).

    ``weight`` is the packed tensor (an mkldnn tensor: dtype, device and shape read as the original's, so HF's
    checks of them pass; arithmetic on it outside oneDNN fails loudly rather than silently), or the original
    dense parameter when ``keep_dense``; then ``packed_copy`` adds ``packed_weight``, a packed copy the product
    is computed on (the dense one stays for the modules sharing it)."""

    def __init__(self, linear: nn.Linear, keep_dense: bool = False, packed_copy: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = None if keep_dense and not packed_copy else \
            torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_ROWS)
        if keep_dense:
            self.weight = linear.weight
            self.register_buffer("packed_weight", packed, persistent=False)
        else:
            self.register_buffer("weight", packed, persistent=False)
            self.packed_weight = None
        self.bias = linear.bias

    @property
    def packed(self) -> bool:
        """Its weight is held packed only (False: dense, shared with another module)."""
        return self.weight.is_mkldnn

    @property
    def copied(self) -> bool:
        """A shared dense weight whose product runs on a packed copy."""
        return self.packed_weight is not None

    def dense(self) -> torch.Tensor:
        """The weight as a dense [out, in] tensor (a copy when packed; the reorder is exact)."""
        return self.weight.to_dense() if self.packed else self.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        bias = None if self.bias is None else self.bias.detach()  # the op has no backward
        weight = self.weight if self.packed_weight is None else self.packed_weight
        y = torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        how = "packed" if self.packed else "dense, shared, a packed copy" if self.copied else "dense, shared"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {how}"


def pack(linear: nn.Module, shared: set[int], min_elements: int = 0,
         copy_max_bytes: int = TIED_COPY_MAX_BYTES) -> nn.Module:
    """``linear`` as a PackedLinear when it is a plain float32 CPU nn.Linear of at least ``min_elements``
    weights, else unchanged. ``shared``: ids of weights other modules also use (kept dense; computed on a packed
    copy when it is at most ``copy_max_bytes``)."""
    weight = linear.weight if type(linear) is nn.Linear else None
    if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.numel() < min_elements:
        return linear
    tied = id(weight) in shared
    return PackedLinear(linear, keep_dense=tied, packed_copy=tied and weight.numel() * 4 <= copy_max_bytes)


def pack_linears(model: nn.Module, min_elements: int = 0) -> list[PackedLinear]:
    """Replace every plain float32 CPU nn.Linear inside ``model`` of at least ``min_elements`` weights (wrapped
    ones included: an AdapterLinear's ``base_layer``) with a PackedLinear, in place; returns the new modules.
    One at a time, so each dense weight can be freed as soon as its packed copy exists (holding them all would
    need the linears' memory twice at start-up). The caller releases the checkpoint's file mapping afterwards
    (loader.own_file_tensors), else the tensors still viewing it keep the dropped weights' pages resident."""
    shared = shared_weights(model)
    names = [name for name, module in model.named_modules() if name and type(module) is nn.Linear]
    done = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = pack(getattr(parent, child), shared, min_elements)
        if isinstance(new, PackedLinear):
            setattr(parent, child, new)
            done.append(new)
    return done


def shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module of ``model`` (tied weights)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, uses in seen.items() if uses > 1}
