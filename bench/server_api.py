"""The slice of the ``server`` package the traffic workloads use, for every engine version: whichever
``server`` comes first on sys.path (this tree's, or another commit's in a subprocess: bench/baseline.py).

    engine v2 (43ab22d on)   AsyncEngine in server.engine.async_engine; a paged KV pool, whose stats() say
                             kv_cache_usage (share of blocks held) and kv_cache_bytes (the pool)
    engine v1 (b715e68)      AsyncEngine in server.engine.async_engine, also server.engine.engine; a dense KV
                             buffer [rows, heads, columns, dim] per layer whose columns double on demand up to
                             max_model_len; kv_cache_usage = live tokens / (max_num_seqs x max_model_len);
                             no prefix cache, chunked prefill or preemption (nor their observer hooks)

Only EngineConfig fields the checkout knows are passed (others are reported as dropped).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


def engine_class():
    try:
        from server.engine.async_engine import AsyncEngine
    except ImportError:  # before the split, engine.py held it
        from server.engine.engine import AsyncEngine
    return AsyncEngine


def engine_config(**wanted):
    """(EngineConfig of the fields this checkout has, names of the wanted fields it lacks)."""
    from server.config import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    return (EngineConfig(**{k: v for k, v in wanted.items() if k in known}),
            sorted(k for k in wanted if k not in known))


def server_dir() -> str:
    import server

    return str(Path(server.__file__).resolve().parent)


def paged(engine) -> bool:
    """True for engine v2's paged KV pool (prefix cache, preemption, their observer hooks)."""
    return "kv_cache_bytes" in engine.stats()


def kv_bytes(engine) -> tuple[float, float]:
    """(bytes of KV held by running sequences, bytes the KV cache holds in all) now.

    v2: held blocks x block bytes, and the pool (allocated at start, and on CPU made resident from then).
    v1: live tokens x bytes per token, and its buffer as grown so far (rows x columns; it reads the runner's
    KVCache, which v1's stats() does not report)."""
    stats = engine.stats()
    if "kv_cache_bytes" in stats:
        return stats["kv_cache_usage"] * stats["kv_cache_bytes"], float(stats["kv_cache_bytes"])
    kv = engine.engine.runner.kv
    return stats["kv_cache_usage"] * kv.max_nbytes, float(kv.nbytes)


async def kv_resident(engine) -> None:
    """Wait until the engine's KV pool is resident: on CPU this tree populates it on a background thread after
    start (host_memory.populate_in_background), and no measured step should race that thread for the CPUs.
    Engines before that populated at start or not at all: nothing to wait for."""
    import asyncio

    event = getattr(engine.engine.runner, "kv_resident", None)
    if event is not None:
        await asyncio.to_thread(event.wait)


def describe(engine) -> dict:
    """The settings a reader needs to compare two engines: the config as the engine holds it (defaults
    resolved where the engine resolves them) and the per-step token budget its scheduler enforces."""
    cfg = engine.config
    keys = ("max_num_seqs", "max_model_len", "max_loras", "max_cpu_loras", "max_lora_rank", "max_num_batched_tokens",
            "kv_cache_memory", "block_size", "enable_prefix_caching", "threads", "lora_kernel", "cpu_gemm", "dtype")
    out = {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}
    out["token_budget"] = getattr(getattr(engine.engine, "scheduler", None), "token_budget", None)
    out["paged"] = paged(engine)
    out["kv_bytes"] = kv_bytes(engine)[1]
    return out
