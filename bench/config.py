"""BenchConfig: every knob of one benchmark run, and the three presets (quick, default, full)."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

PRESETS = {
    # ~2-3 min on 2 shared CPU cores: the headline cell (32 x 16) and its two edges
    "quick": dict(concurrency=[1, 32], adapters=[1, 16], max_tokens=16, naive_requests=2, swap_samples=3),
    # ~6-9 min: the grid of the issue minus 64 adapters
    "default": dict(concurrency=[1, 8, 32], adapters=[1, 4, 16], max_tokens=32, naive_requests=3, swap_samples=5),
    # GPU or a quiet machine: larger grid, longer outputs
    "full": dict(concurrency=[1, 8, 32, 64], adapters=[1, 4, 16, 64], max_tokens=64, naive_requests=4,
                 swap_samples=8),
}


@dataclass
class BenchConfig:
    preset: str = "default"
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    adapters: list[int] = field(default_factory=lambda: [1, 4, 16])  # distinct adapters per cell
    max_tokens: int = 32  # fixed output length (ignore_eos / min_new_tokens)
    prompt_tokens: int = 32  # every prompt has exactly this many tokens (no padding in the HF anchors)
    lora_rank: int = 16
    naive_requests: int = 3  # the serial flow runs this many requests per cell (it does not batch)
    swap_samples: int = 5  # adapters per swap-cost measurement
    interference_loads: int = 10  # cold loads started while streams decode
    interference_streams: int = 16
    threads: int = 0  # torch intra-op threads; 0 = auto (the CPUs not busy with other work, see auto_threads)
    seed: int = 0
    model: str = ""  # "" = the default model (SmolLM2-135M-Instruct GGUF), dequantized to fp32 and cached
    cache_dir: str = str(Path.home() / ".cache" / "swapserve-bench")
    out_dir: str = "bench/results"
    markdown: str = "BENCHMARKS.md"
    skip_anchors: bool = False
    command: str = ""

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(concurrency, distinct adapters) pairs; more adapters than requests is not a distinct case."""
        return [(n, k) for n in self.concurrency for k in self.adapters if k <= n]

    @property
    def max_adapters(self) -> int:
        return max(k for _, k in self.cells)

    def to_dict(self) -> dict:
        return asdict(self)


def auto_threads() -> int:
    """CPUs minus the load already on them (1-minute load average), at least 1.

    On a shared machine oversubscribed intra-op threads wait on each other at every op's barrier: measured
    here, a 32-row forward took 1.2-1.4 s with 1 thread and 7-11 s with 2 threads while two other processes
    ran. Leaving the busy CPUs alone keeps the numbers (and the ratios) stable.
    """
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cpus, round(cpus - busy)))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="preset")
    size.add_argument("--full", action="store_const", const="full", dest="preset")
    p.add_argument("--concurrency", type=_ints, help="comma-separated, e.g. 1,8,32")
    p.add_argument("--adapters", type=_ints, help="distinct adapters per cell, e.g. 1,4,16")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--naive-requests", type=int)
    p.add_argument("--swap-samples", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: auto, the CPUs not already busy)")
    p.add_argument("--model", help="HF directory or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir")
    p.add_argument("--out-dir")
    p.add_argument("--markdown", help="where to write the table ('' = do not write)")
    p.add_argument("--skip-anchors", action="store_true", default=None, help="swapserve only (no HF/PEFT)")
    args = vars(p.parse_args(argv))
    preset = args.pop("preset") or "default"
    values = {**PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}
    cfg = BenchConfig(preset=preset, **values)
    if not cfg.cells:
        p.error(f"no cell has adapters <= concurrency (concurrency {cfg.concurrency}, adapters {cfg.adapters})")
    return cfg
