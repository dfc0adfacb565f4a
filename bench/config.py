"""BenchConfig: every knob of one benchmark run, and the three presets (quick, default, full)."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field

PRESETS = {
    # ~2-3 min on 2 shared CPU cores: the headline cell (32 x 16) and its two edges
    "quick": dict(concurrency=[1, 32], adapters=[1, 16], max_tokens=16, naive_requests=2, swap_samples=3,
                  scale_rounds=1),
    # ~9 min (553 s on 2 shared cores, 2026-12-02): the grid of the issue (64 adapters as 64 requests, one each), the
    # IA3 and mixed cells, the 200-adapter Zipf scale run (2 rounds) and the plain / int8 / nf4 memory subprocesses
    "default": dict(concurrency=[1, 8, 32], adapters=[1, 4, 16, 64], max_tokens=32, naive_requests=3,
                    swap_samples=5),
    # GPU or a quiet machine: larger grid, longer outputs
    "full": dict(concurrency=[1, 8, 32, 64], adapters=[1, 4, 16, 64], max_tokens=64, naive_requests=4,
                 swap_samples=8),
}


@dataclass
class BenchConfig:
    preset: str = "default"
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    adapters: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # distinct adapters per cell
    max_tokens: int = 32  # fixed output length (ignore_eos / min_new_tokens)
    prompt_tokens: int = 32  # every prompt has exactly this many tokens (no padding in the HF anchors)
    lora_rank: int = 16
    naive_requests: int = 3  # the serial flow runs this many requests per cell (it does not batch)
    swap_samples: int = 5  # adapters per swap-cost measurement
    interference_loads: int = 10  # cold loads started while streams decode
    interference_streams: int = 16
    interference_rounds: int = 3  # quiet/loading pairs; the table shows their medians
    threads: int = 0  # torch intra-op threads; 0 = auto (the server's own count, less busy CPUs: auto_threads)
    # scale: adapters registered on disk, requested Zipf(s) by many concurrent requests, loaded on demand
    scale_adapters: int = 200
    scale_requests: int = 64
    scale_cpu_loras: int = 32  # host tier of the scale engine (max_cpu_loras)
    scale_loras: int = 16  # device slots of the scale engine (max_loras)
    scale_rank: int = 16
    zipf_s: float = 1.1
    scale_rounds: int = 2  # round 1 starts with an empty host tier; later rounds draw again on the warm tiers
    # adapter types: an IA3 cell and a mixed LoRA/DoRA/IA3/AdaLoRA cell
    types_concurrency: int = 32
    types_adapters: int = 16
    structured_share: float = 0.0  # share of the 32 x 16 cell's requests given a JSON grammar (bench/structured.py); 0 = skip
    skip_scale: bool = False
    skip_memory: bool = False
    skip_types: bool = False
    skip_http: bool = False  # the target cell and load interference through `python -m server serve` (bench/http.py)
    seed: int = 0
    model: str = ""  # "" = the default model (SmolLM2-135M-Instruct GGUF), dequantized to fp32 and cached
    device: str = "cpu"  # cpu | cuda: every system runs there
    dtype: str = "float32"  # the base model's (and adapter slots') dtype, for every system
    quantization: str = "none"  # none | int8 | nf4: the base model of every system, quantized alike
    cache_dir: str = field(default_factory=lambda: _server_cache_dir())  # the server's own GGUF cache
    out_dir: str = "bench/results"
    markdown: str = "BENCHMARKS.md"
    skip_anchors: bool = False
    command: str = ""

    @property
    def cells(self) -> list[tuple[int, int]]:
        """(concurrency, distinct adapters) pairs. More adapters than requests in one batch is not a distinct
        case, so an adapter count above every concurrency runs at that many requests, one adapter each."""
        top = max(self.concurrency)
        return [(n, k) for n in self.concurrency for k in self.adapters if k <= n] + \
            [(k, k) for k in self.adapters if k > top]

    @property
    def max_concurrency(self) -> int:
        return max(n for n, _ in self.cells)

    @property
    def max_adapters(self) -> int:
        return max(k for _, k in self.cells)

    def to_dict(self) -> dict:
        return asdict(self)


def _server_cache_dir() -> str:
    from server.config import default_cache_dir

    return default_cache_dir()


def auto_threads() -> int:
    """What the server itself takes (every core but one: loader.serving_threads), less the load already on the
    CPUs (1-minute load average), at least 1. Every system in a run uses this one count, anchors included.

    On a shared machine oversubscribed intra-op threads wait on each other at every op's barrier: measured
    here, a 32-row forward took 1.2-1.4 s with 1 thread and 7-11 s with 2 threads while two other processes
    ran. Leaving the busy CPUs alone keeps the numbers (and the ratios) stable.
    """
    from server.engine.loader import serving_threads

    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(serving_threads(), round(cpus - busy)))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="preset")
    size.add_argument("--full", action="store_const", const="full", dest="preset")
    p.add_argument("--concurrency", type=_ints, help="comma-separated, e.g. 1,8,32")
    p.add_argument("--adapters", type=_ints, help="distinct adapters per cell, e.g. 1,4,16,64 (one above every concurrency runs as that many requests, one adapter each)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--naive-requests", type=int)
    p.add_argument("--swap-samples", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: auto, the CPUs not already busy)")
    p.add_argument("--model", help="HF directory or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="where every system runs (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)")
    p.add_argument("--quantization", choices=("none", "int8", "nf4"),
                   help="quantize the base model of every system alike (default none)")
    p.add_argument("--cache-dir")
    p.add_argument("--out-dir")
    p.add_argument("--markdown", help="where to write the table ('' = do not write)")
    p.add_argument("--skip-anchors", action="store_true", default=None, help="swapserve only (no HF/PEFT)")
    p.add_argument("--scale-adapters", type=int, help="adapters on disk for the scale run (default 200)")
    p.add_argument("--scale-requests", type=int, help="concurrent requests of the scale run (default 64)")
    p.add_argument("--scale-rank", type=int, help="LoRA rank of the scale adapters (default 16)")
    p.add_argument("--scale-rounds", type=int)
    p.add_argument("--structured-share", type=float, help="also run the 32 x 16 cell with this share of its requests "
                   "under a JSON-schema grammar, against the same cell all free (e.g. 0.25; default: skip)")
    p.add_argument("--skip-scale", action="store_true", default=None)
    p.add_argument("--skip-memory", action="store_true", default=None)
    p.add_argument("--skip-types", action="store_true", default=None)
    p.add_argument("--skip-http", action="store_true", default=None,
                   help="skip the run through the real HTTP server (a `python -m server serve` child)")
    args = vars(p.parse_args(argv))
    preset = args.pop("preset") or "default"
    values = {**PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}
    cfg = BenchConfig(preset=preset, **values)
    if not cfg.cells:
        p.error(f"no cell has adapters <= concurrency (concurrency {cfg.concurrency}, adapters {cfg.adapters})")
    return cfg
