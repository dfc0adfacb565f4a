"""Resident memory of the base model, plain vs int8 vs nf4, each measured in a fresh subprocess
(``python -m bench.memory <quantization> <model dir>`` prints one JSON line), so one load's allocator state
never leaks into the next; and bytes per adapter in each tier.

    rss_after_imports  VmRSS once torch/transformers/bitsandbytes are imported (the floor every row shares)
    rss_loaded         VmRSS after server.engine.loader.load_model returned and --cpu-gemm auto packed its
                       float32 CPU linears as the server does (loader.pack_cpu_linears), one 8-token forward ran
                       (so the mmapped safetensors pages a server touches are counted), gc and malloc_trim
    model_rss          rss_loaded - rss_after_imports: what the resident model costs the process
    peak_rss           VmHWM: the high-water mark during loading (quantizing reads the fp32 weights first)
    parameter_bytes    loader.parameter_bytes: the weights as stored (packed bytes for int8 / nf4)
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

QUANTIZATIONS = ("none", "int8", "nf4")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def measure(quantization: str, model: str) -> dict:
    import gc

    import bitsandbytes  # noqa: F401  (imported up front so its import is part of the shared floor)
    import torch

    from server.config import EngineConfig
    from server.engine.loader import load_model, pack_cpu_linears, parameter_bytes

    floor = _status("VmRSS")
    start = time.perf_counter()
    config = EngineConfig(model=model, dtype="float32", device="cpu", quantization=quantization, threads=1)
    loaded = load_model(config)
    pack_cpu_linears(loaded.model, config.cpu_gemm, loaded.device, loaded.dtype, quantization)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        loaded.model(input_ids=torch.ones(1, 8, dtype=torch.long))
    gc.collect()
    _malloc_trim()
    rss = _status("VmRSS")
    return {"quantization": quantization, "rss_after_imports": floor, "rss_loaded": rss, "model_rss": rss - floor,
            "rss_anon": _status("RssAnon"), "rss_file": _status("RssFile"), "peak_rss": _status("VmHWM"),
            "parameter_bytes": parameter_bytes(loaded.model), "load_seconds": seconds}


def _malloc_trim() -> None:
    """Hand freed heap back to the OS (the fp32 weights a quantized load read and dropped)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


async def model_memory(model: str, quantizations=QUANTIZATIONS) -> list[dict]:
    """One subprocess per quantization, run side by side (RSS does not depend on timing)."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

    async def one(q: str) -> dict:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.memory", q, model, env=env,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        if proc.returncode != 0:
            return {"quantization": q, "error": err.decode(errors="replace").strip().splitlines()[-1:]}
        return json.loads(out.decode().strip().splitlines()[-1])

    return list(await asyncio.gather(*(one(q) for q in quantizations)))


def adapter_tiers(disk_bytes: int, host_bytes: int, slot_bytes: int, max_loras: int, rank: int) -> dict:
    """Bytes one adapter occupies per tier. The device tier is preallocated: every slot costs
    slot_bytes / max_loras whatever the adapter's rank (slots are sized for --max-lora-rank)."""
    return {"disk_bytes": disk_bytes, "host_bytes": host_bytes, "device_slot_bytes": slot_bytes // max_loras,
            "device_total_bytes": slot_bytes, "max_loras": max_loras, "rank": rank}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
