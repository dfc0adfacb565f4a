"""PagedKVCache: one key and one value pool per layer, in fixed-size blocks shared by every sequence.

Layout: ``keys[layer]: [num_blocks * block_size, kv_heads, head_dim]``; the token at position p of a sequence
with blocks ``block_ids`` lives in slot ``block_ids[p // block_size] * block_size + p % block_size``. The pools
are allocated once at start from a byte budget (``--kv-cache-memory``); sequences take blocks as they grow and
give them back when they finish, so the pool is sized by a budget, never ``max_num_seqs x max_model_len``. On CPU
the runner makes the pools resident from the start, on a background thread (host_memory.populate_in_background): a
step no longer pays a page fault for the first write to each of its blocks' pages. Block 0 (the null block) is
zeroed and never written: padded attention reads it (see block_pool.py).
"""
from __future__ import annotations

import logging

import torch

from server.config import parse_memory
from server.engine.block_pool import NULL_BLOCK

log = logging.getLogger(__name__)

CPU_DEFAULT_BYTES = 4 << 30  # like vLLM's CPU backend (VLLM_CPU_KVCACHE_SPACE=4 GiB), at most half the free RAM
GPU_DEFAULT_SHARE = 0.9  # of the device memory free after the model loaded, like --gpu-memory-utilization
def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (MemAvailable on CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def budget_bytes(spec: str, device: torch.device, useful: int) -> int:
    """The KV pools' byte budget for ``--kv-cache-memory`` on ``device``. ``useful``: the bytes of every
    sequence at its longest twice over (the running batch, plus as much again kept for prefix reuse); auto
    takes no more than that, a size or a fraction given is taken as it is."""
    kind, value = parse_memory(spec)
    free = free_memory(device)
    if kind == "bytes":
        if free is not None and value > free:
            raise MemoryError(f"--kv-cache-memory {spec}: {value / 2**30:.2f} GiB asked but only "
                              f"{free / 2**30:.2f} GiB is free on {device}; give a smaller size or a fraction")
        return int(value)
    if free is None:
        raise MemoryError(f"--kv-cache-memory {spec}: cannot read the free memory on {device}; give a size in bytes")
    if kind == "share":
        return int(free * value)
    if device.type == "cuda":
        return min(useful, int(free * GPU_DEFAULT_SHARE))
    return min(useful, CPU_DEFAULT_BYTES, free // 2)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        null = slice(NULL_BLOCK * block_size, (NULL_BLOCK + 1) * block_size)
        for t in self.keys + self.values:
            t[null].zero_()

    @staticmethod
    def shape_of(model_config) -> tuple[int, int, int]:
        """(num_layers, kv_heads, head_dim) of a Hugging Face model config."""
        cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers, kv_heads, head_dim

    @staticmethod
    def block_bytes(model_config, block_size: int, dtype: torch.dtype) -> int:
        layers, kv_heads, head_dim = PagedKVCache.shape_of(model_config)
        return 2 * layers * block_size * kv_heads * head_dim * dtype.itemsize

    @classmethod
    def for_model(cls, model_config, budget: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> "PagedKVCache":
        num_blocks = budget // cls.block_bytes(model_config, block_size, dtype)
        if num_blocks < 2:
            raise MemoryError(f"--kv-cache-memory: {budget / 2**20:.1f} MiB holds {num_blocks} KV block(s) of "
                              f"{block_size} tokens for this model; give at least "
                              f"{2 * cls.block_bytes(model_config, block_size, dtype) / 2**20:.1f} MiB")
        layers, kv_heads, head_dim = cls.shape_of(model_config)
        return cls(layers, num_blocks, block_size, kv_heads, head_dim, dtype, device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the step's new tokens. slots: [T] long; key, value: [T, kv_heads, head_dim]."""
        self.keys[layer].index_copy_(0, slots, key.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(0, slots, value.to(self.values[layer].dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (any shape S): each [*S, kv_heads, head_dim]."""
        flat = slots.reshape(-1)
        shape = (*slots.shape, self.kv_heads, self.head_dim)
        return (self.keys[layer].index_select(0, flat).view(shape),
                self.values[layer].index_select(0, flat).view(shape))
