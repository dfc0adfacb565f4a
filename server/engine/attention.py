"""PagedAttention: attention over the paged KV cache for a flat token batch, plugged into unmodified Hugging Face
models through transformers' ``AttentionInterface``.

The runner feeds the model one flat batch, ``[1, num_tokens]``, with per-token positions (RoPE is the model's own)
and no mask: the model computes q, k, v as usual and calls ``paged_attention`` per layer, which writes the step's
keys and values into their slots, then attends each sequence over its own tokens:

    decodes:       sequences computing one token, batched: on CPU (float32, numba) one compiled loop reads each
                   cached key and value once where it lies (attention_kernels.py); on CUDA one Triton kernel does
                   the same through device block tables (attention_triton.py); elsewhere (the reference)
                   groups of similar length are gathered and padded, and the kv-head's G = heads / kv_heads
                   queries are folded into SDPA's query length so each key is read once per kv head
    prefill spans: one sequence's chunk of q tokens after ``ctx`` computed ones, causal (offset ``ctx``);
                   with ctx = 0 it attends to the chunk's own keys, no gather

Every layer writes before it reads, so a chunk sees its own keys. Padded positions read the null block (zeros):
masked scores weigh exactly 0 and a zero value row keeps that 0 exact, whatever was freed there before.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from server.engine import attention_kernels
from server.engine.attention_kernels import paged_decode
from server.engine.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

IMPLEMENTATION = "swapserve_paged"


@dataclass
class DecodeGroup:
    lo: int  # query tokens [lo, hi) of the flat batch, one per sequence
    hi: int
    kv_index: torch.Tensor  # [n, L] cache slots of each sequence's tokens, the null slot past its length
    mask: torch.Tensor | None  # [n, 1, 1, L] bool, None when every sequence is L long


@dataclass
class PrefillSpan:
    lo: int  # query tokens [lo, hi): one sequence's chunk, positions ctx .. ctx + (hi - lo) - 1
    hi: int
    ctx: int  # tokens of the sequence computed before this chunk
    kv_index: torch.Tensor | None  # [ctx + q] cache slots of positions 0 .. ctx + q - 1; None when ctx == 0
    mask: torch.Tensor | None  # [q, ctx + q] bool, causal with offset ctx; None when ctx == 0


@dataclass
class DecodeBatch:
    """Every decoding sequence of the step, for the kernels: numpy for numba's, device tensors for Triton's."""

    lo: int  # query tokens [lo, hi) of the flat batch, one per sequence
    hi: int
    tables: np.ndarray  # [n, max_blocks] int64 block ids (0, the null block, past a sequence's blocks)
    lengths: np.ndarray  # [n] int64 tokens each attends to (its computed tokens plus this one)
    device_tables: torch.Tensor | None = None  # the same as int32 on the cache's device (the Triton path only)
    device_lengths: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """One step's attention plan, built once per step (step_input.StepInput) and read by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] long: the cache slot each new token's key and value go to
    decode: DecodeBatch | None = None
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # the same decodes for the torch path
    prefill: list[PrefillSpan] = field(default_factory=list)


class PagedAttention:
    """The step's metadata and the cache, shared by every attention module of one model (set by ``install``).
    ``decode``: which path decodes take, one of DECODE_PATHS (chosen at start, see attention_kernel_choice)."""

    def __init__(self, kv: PagedKVCache, decode: str = "torch"):
        if decode not in DECODE_PATHS:
            raise ValueError(f"decode attention path {decode!r}: one of {DECODE_PATHS}")
        self.kv = kv
        self.decode = decode
        self.meta: AttentionMetadata | None = None
        if decode == "triton":  # imported only here: triton is optional, and read TRITON_INTERPRET at import
            from server.engine.attention_triton import paged_decode as triton_decode
            self._triton_decode = triton_decode

    def forward(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float | None) -> torch.Tensor:
        """query: [1, heads, T, d]; key, value: [1, kv_heads, T, d] (RoPE applied). Returns [1, T, heads, d]."""
        meta = self.meta
        q = query[0]  # [H, T, d]
        heads, num_tokens, dim = q.shape
        self.kv.write(layer, meta.slot_mapping, key[0].transpose(0, 1), value[0].transpose(0, 1))
        out = q.new_empty(num_tokens, heads, dim)
        d = meta.decode
        if self.decode == "numba" and d is not None:
            paged_decode(q[:, d.lo:d.hi].transpose(0, 1).contiguous(), self.kv.keys[layer], self.kv.values[layer],
                         d.tables, d.lengths, self.kv.block_size, scale, out[d.lo:d.hi])
        elif self.decode == "triton" and d is not None:
            self._triton_decode(q[:, d.lo:d.hi].transpose(0, 1), self.kv.keys[layer], self.kv.values[layer],
                                d.device_tables, d.device_lengths, self.kv.block_size, scale, out[d.lo:d.hi])
        else:
            for g in meta.decode_groups:
                out[g.lo:g.hi] = self._decode(layer, q[:, g.lo:g.hi], g, scale)
        for p in meta.prefill:
            out[p.lo:p.hi] = self._prefill(layer, q[:, p.lo:p.hi], key[:, :, p.lo:p.hi], value[:, :, p.lo:p.hi],
                                           p, scale)
        return out[None]

    def _decode(self, layer: int, q: torch.Tensor, g: DecodeGroup, scale) -> torch.Tensor:
        """The reference decode (and the path where no kernel applies: 16-bit on CPU, CUDA without triton):
        q: [H, n, d] -> [n, H, d]; head h reads kv head h // G (Hugging Face's repeat_kv order)."""
        heads, n, dim = q.shape
        kv_heads = self.kv.kv_heads
        keys, values = self.kv.gather(layer, g.kv_index)  # [n, L, kvh, d]
        folded = q.transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)  # [n, kvh, G, d]
        o = F.scaled_dot_product_attention(folded, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=g.mask,
                                           scale=scale)  # [n, kvh, G, d]
        return o.reshape(n, heads, dim)

    def _prefill(self, layer: int, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, p: PrefillSpan,
                 scale) -> torch.Tensor:
        """q: [H, q, d]; key, value: [1, kvh, q, d] (the chunk's own) -> [q, H, d]."""
        if p.kv_index is None:
            o = F.scaled_dot_product_attention(q[None], key, value, is_causal=True, scale=scale, enable_gqa=True)
        else:
            keys, values = self.kv.gather(layer, p.kv_index)  # [ctx + q, kvh, d]
            o = F.scaled_dot_product_attention(q[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                               attn_mask=p.mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)


DECODE_PATHS = ("numba", "torch", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton installed and able to run on ``device``: CUDA, or CPU under its interpreter (TRITON_INTERPRET=1,
    the tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from server.engine import attention_triton
    except ImportError:
        return False
    return attention_triton.usable(device)


def attention_kernel_choice(choice: str, device: torch.device, dtype: torch.dtype) -> str:
    """--attention-kernel: which decode path, one of DECODE_PATHS. auto: numba for float32 on CPU with numba
    installed (compiled here, before the first request), triton on CUDA with triton installed, else torch."""
    numba_usable = device.type == "cpu" and dtype == torch.float32 and attention_kernels.available()
    if choice == "numba" and not numba_usable:
        raise ValueError("--attention-kernel numba needs float32 on CPU and the numba package (here: "
                         f"{dtype} on {device}); use --attention-kernel auto or torch")
    if choice == "triton" and not triton_usable(device):
        interpreted = " (on a CPU only under TRITON_INTERPRET=1, for tests)" if device.type == "cpu" else ""
        raise ValueError(f"--attention-kernel triton needs a CUDA device and the triton package{interpreted} "
                         f"(here: {device}, triton "
                         + ("installed" if importlib.util.find_spec("triton") else "missing")
                         + f", TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}); "
                         "use --attention-kernel auto or torch")
    if choice == "auto":
        if numba_usable:
            choice = "numba"
        elif device.type == "cuda" and triton_usable(device):
            choice = "triton"
        else:
            choice = "torch"
    if choice == "numba":
        attention_kernels.warm_up()
        log.info("decode attention: numba (a compiled loop over the paged cache); prefill chunks: SDPA")
    elif choice == "triton":
        log.info("decode attention: triton (one kernel over the paged cache's block tables); prefill chunks: SDPA")
    else:
        log.info("decode attention: torch (gather + SDPA); prefill chunks: SDPA")
    return choice


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; the step's state hangs on the module (see ``install``)."""
    return module.swapserve_attention.forward(module.layer_idx, query, key, value, scaling), None


def _unsupported(config) -> list[str]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    reasons = []
    layer_types = getattr(cfg, "layer_types", None) or ()
    if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in layer_types:
        reasons.append("sliding-window attention")
    if getattr(cfg, "attn_logit_softcapping", None):
        reasons.append("attention logit soft-capping")
    if getattr(cfg, "is_encoder_decoder", False):
        reasons.append("encoder-decoder attention")
    return reasons


def install(model, state: PagedAttention) -> int:
    """Route every attention layer of ``model`` through ``state``; returns how many layers it covers. Refuses,
    at start-up, models whose attention it does not implement."""
    from transformers import AttentionInterface

    reasons = _unsupported(model.config)
    attention = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    if not getattr(model, "_supports_attention_backend", False) or not attention:
        reasons.append("no pluggable attention (transformers' AttentionInterface)")
    if any(hasattr(m, "sinks") for m in attention):
        reasons.append("attention sinks")
    if reasons:
        raise ValueError(f"{type(model).__name__}: the paged KV cache does not support {', '.join(reasons)}; "
                         "serve a Llama-family model (Llama, Mistral, Qwen2/3, SmolLM, ...)")
    AttentionInterface.register(IMPLEMENTATION, paged_attention)
    model.set_attn_implementation(IMPLEMENTATION)
    for module in attention:
        module.swapserve_attention = state
    return len(attention)
