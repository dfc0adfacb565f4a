"""Load the resident base model and its tokenizer: Hub id, local HF directory or .gguf file; plain or
bitsandbytes-quantized; never with trust_remote_code.

A .gguf file is dequantized once into a safetensors directory (weights and tokenizer) under
``EngineConfig.cache_dir``, keyed by the file's path, size and mtime; every later start-up, plain or quantized,
loads that directory (seconds) instead of converting the GGUF again (about a minute on a small CPU), and
bitsandbytes quantization reads it like any HF checkpoint (transformers cannot quantize while reading GGUF).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from server import progress
from server.config import EngineConfig
from server.layers import gemm

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_CACHE_VERSION = 1  # part of the cache key: bump when the conversion changes
SOURCE_FILE = "swapserve-source.json"  # written into each cached copy: what it was converted from


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # compute dtype (activations, KV cache, adapter slots)
    weights_from: str = ""  # what from_pretrained read: the model id/directory, or the GGUF's cached copy
    gguf_cache_hit: bool | None = None  # GGUF models only: True = the cached copy existed, False = converted now


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU matmuls in half precision are slow and less exact


def serving_threads() -> int:
    """--threads 0 on CPU: every usable core (usable_cores) but one, at least one. The spare core runs what
    is not matmuls: the HTTP server and event loop, the step loop's Python, the adapter loader. Measured on 2
    cores, 32 streams over 16 adapters: with 2 intra-op threads the OpenMP team kept losing a core to the event
    loop and inter-token latency rose from 150 to 250-310 ms a step; with 1 it stayed at 150. (vLLM's CPU
    backend reserves a core for its frontend likewise.)"""
    return max(1, usable_cores() - 1)


def usable_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's or a
    Kubernetes pod's CPU limit, which affinity does not show: a 4-CPU pod on a 64-core node sees 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def set_threads(threads: int, device: torch.device) -> None:
    """torch's intra-op thread count: ``threads``, or 0 for serving_threads() on CPU (torch's default on GPU,
    where the CPU only feeds kernels). Threads started later inherit it."""
    chosen = threads or (serving_threads() if device.type == "cpu" else 0)
    if chosen:
        torch.set_num_threads(chosen)
    how = "" if threads else (" (all cores but one, for the server)" if chosen else " (torch's default)")
    log.info("torch intra-op threads: %d%s", torch.get_num_threads(), how)


def _source(model: str) -> tuple[str, dict]:
    """(from_pretrained path or id, extra kwargs) for a Hub id, a local directory or a .gguf file."""
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    if model.startswith(("/", "./", "../", "~")) and not path.exists():  # a path, not a Hub id
        raise FileNotFoundError(f"--model {model}: no such directory (give a model directory, a .gguf file or a "
                                "Hugging Face repo id)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {model}: the directory holds no config.json (not a Hugging Face model "
                                "directory; give one, a .gguf file or a Hugging Face repo id)")
    return str(path) if path.exists() else model, {}


# ---- GGUF -> safetensors, cached ----------------------------------------------------------------------------
def gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    """The cached copy's directory: <cache_dir>/gguf/<stem>-<hash of resolved path, size, mtime, version>."""
    gguf = gguf.resolve()
    st = gguf.stat()
    key = f"{gguf}\0{st.st_size}\0{st.st_mtime_ns}\0v{GGUF_CACHE_VERSION}"
    return cache_dir / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cached_gguf_dir(gguf: Path, cache_dir: Path) -> tuple[Path, bool]:
    """(safetensors directory for ``gguf``, whether it was already cached); converts on a miss."""
    out = gguf_cache_path(gguf, cache_dir)
    if (out / SOURCE_FILE).is_file():
        log.info("GGUF %s: loading its cached safetensors copy %s", gguf.name, out)
        return out, True
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        partial.chmod(0o755)  # mkdtemp makes it private; the finished copy is an ordinary directory
    except OSError as exc:  # a read-only cache still serves the copies it has; new ones go to the temp dir
        fallback = Path(tempfile.gettempdir()) / "swapserve-cache"
        if cache_dir.resolve() == fallback.resolve():
            raise
        log.warning("--cache-dir %s is not writable (%s); using %s", cache_dir, exc, fallback)
        return cached_gguf_dir(gguf, fallback)
    log.info("GGUF %s: no cached copy yet; converting it once to %s (later start-ups load that)", gguf, out)
    try:
        convert_gguf(gguf, partial)
        try:
            partial.rename(out)  # atomic: readers see a complete copy or none
        except OSError:
            if not (out / SOURCE_FILE).is_file():  # not a concurrent converter winning the race
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out, False


def _remove_abandoned(out: Path) -> None:
    """Delete partial copies of ``out`` whose converting process is gone (killed mid-conversion)."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s (an abandoned conversion)", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def convert_gguf(src: Path, out: Path) -> None:
    """Write ``src`` dequantized to fp32 as an HF directory: model.safetensors, config, generation config,
    tokenizer, and SOURCE_FILE (written last: the copy is complete when it exists)."""
    stages = progress.bar(total=3, desc=f"converting {src.name}", unit="stage")  # tokenizer, weights, write
    t0 = time.perf_counter()
    log.info("GGUF %s: converting the tokenizer ...", src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)
    t1 = time.perf_counter()
    stages.update()
    log.info("GGUF %s: tokenizer converted in %.1fs; dequantizing the weights ...", src.name, t1 - t0)
    gguf = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                                trust_remote_code=False)
    t2 = time.perf_counter()
    stages.update()
    log.info("GGUF %s: weights dequantized in %.1fs; writing safetensors ...", src.name, t2 - t1)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now; GGUF-quantized models refuse to save
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf.state_dict())
    plain.generation_config = gguf.generation_config
    del gguf
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    st = src.stat()
    (out / SOURCE_FILE).write_text(json.dumps({"gguf": str(src.resolve()), "size": st.st_size,
                                               "mtime_ns": st.st_mtime_ns, "version": GGUF_CACHE_VERSION}))
    stages.update()
    stages.close()
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log.info("GGUF %s: wrote %.0f MiB in %.1fs (conversion total %.1fs)", src.name, size / 2**20,
             time.perf_counter() - t2, time.perf_counter() - t0)


def _weights_source(config: EngineConfig) -> tuple[str, dict, bool | None]:
    """(from_pretrained path or id, extra kwargs, GGUF cache hit or None) for ``config.model``."""
    where, extra = _source(config.model)
    if "gguf_file" not in extra:
        return where, extra, None
    directory, hit = cached_gguf_dir(Path(config.model), Path(config.cache_dir))
    return str(directory), {}, hit


# ---- the model ---------------------------------------------------------------------------------------------
def _quantization_config(kind: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if kind == "none":
        return None
    if kind == "int8":
        # threshold 0 turns off LLM.int8's outlier columns: with it on, a column is computed in fp16 when ANY row
        # of the batch has an outlier there, so one request's output would depend on what it is batched with
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=dtype)


class _Once(logging.Filter):
    """Lets each message through once (bitsandbytes' int8 matmul warned ~1,000 times per short request)."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        first = record.msg not in self.seen
        self.seen.add(record.msg)
        return first


def _once(logger: logging.Logger) -> None:
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


def load_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    set_threads(config.threads, device)
    dtype = resolve_dtype(config.dtype, device)
    where, extra, cache_hit = _weights_source(config)
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **extra)
    quant = _quantization_config(config.quantization, dtype)
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", trust_remote_code=False, **extra)
    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(where, quantization_config=quant, device_map={"": device},
                                                     **kwargs)
        if device.type == "cpu":
            own_file_tensors(model)
    model.eval()
    model.requires_grad_(False)
    exact_int8(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, device, dtype, where, cache_hit)


def is_quantized(model: torch.nn.Module) -> bool:
    """Holds bitsandbytes layers: from --quantization, or a checkpoint saved quantized (served as it is)."""
    return any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())


def exact_int8(model: torch.nn.Module) -> None:
    """Every int8 layer without LLM.int8's outlier split (threshold 0), whoever quantized it: with the split on, a
    column is computed in fp16 for every row when ANY row of the batch has an outlier there, so one request's
    logits depend on what it is batched with. --quantization int8 sets it in its own config; a checkpoint saved
    in int8 carries its own threshold (6.0 by default), which from_pretrained keeps whatever --quantization says."""
    layers = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]
    if not layers:
        return
    _once(logging.getLogger("bitsandbytes.autograd._functions"))  # it warns of the fp16 cast on every matmul
    split = [m for m in layers if m.state.threshold]
    if split:
        log.info("int8 layers: the checkpoint's outlier threshold (%g) set to 0 on %d layers, so a request's "
                 "output never depends on its batch", max(m.state.threshold for m in split), len(split))
    for m in split:
        m.state.threshold = 0.0


@torch.no_grad()
def own_file_tensors(model: torch.nn.Module) -> None:
    """Copy the model's remaining plain tensors (parameters and persistent buffers, not quantized or
    oneDNN-packed ones) out of the checkpoint. Loaded on CPU they are views into the mmapped safetensors file,
    and any one view keeps the whole file mapped and its touched pages resident. Measured on SmolLM2: a
    quantized load kept ~640 MB of file pages for its embeddings, norms and tied head (more than the plain fp32
    model), and --cpu-gemm onednn, which packs every linear into new memory, kept ~500 MB for its embedding."""
    seen: set[int] = set()
    for module in model.modules():
        buffers = [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for name, t in list(module._parameters.items()) + buffers:
            if t is None or id(t) in seen or t.is_mkldnn or type(t).__name__ in ("Params4bit", "Int8Params"):
                continue
            seen.add(id(t))
            if isinstance(t, torch.nn.Parameter):
                t.data = t.data.clone()
            else:
                module._buffers[name] = t.clone()


def pack_cpu_linears(model: torch.nn.Module, choice: str, device: torch.device, dtype: torch.dtype,
                     quantization: str) -> list:
    """--cpu-gemm ``choice`` applied to a loaded model, as it is served (the runner; the benchmarks' anchors and
    memory rows): its plain float32 CPU linears packed for oneDNN (layers/gemm.py), then the checkpoint's file
    mapping released, else the embedding's view would keep the dropped weights' pages resident (a quantized
    load released it already). Returns the PackedLinears made (none when the plan is torch's F.linear)."""
    min_elements = gemm.plan(choice, device, dtype)
    done = [] if min_elements is None else gemm.pack_linears(model, min_elements)
    if done:
        if quantization == "none":
            own_file_tensors(model)
        dense = [m for m in done if not m.packed]
        copied = sum(m.packed_weight.numel() * 4 for m in dense if m.copied)
        small = sum(type(m) is torch.nn.Linear for m in model.modules())
        shared = f"; {len(dense)} sharing a weight (a tied head) kept dense" + (
            f", computed on a packed copy (+{copied / 2**20:.0f} MiB)" if copied else
            f", reordered per call (a copy would exceed {gemm.TIED_COPY_MAX_BYTES >> 20} MiB)") if dense else ""
        log.info("base linears: oneDNN for %d, packed once into its blocked layout (dense copies dropped)%s%s",
                 len(done) - len(dense), shared, f"; {small} under {min_elements} weights stay on F.linear" if small else "")
    return done


@torch.inference_mode()
def settle_layout(model: torch.nn.Module, device: torch.device) -> None:
    """One token through the model, so every quantized layer is in the layout it will serve with before
    anything reads its weight. On CPUs with AVX512-BF16, bitsandbytes repacks each Linear4bit at its first
    inference forward (and its kernel then uses bf16 block scales): a DoRA factor computed from the weight
    before that would differ (~1e-2 in the logits) from one computed after, depending on when the adapter
    was loaded. Serving only: the packed kernel has no backward, so a model that will train must not run it."""
    model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights: parameters, persistent buffers (packed bytes for quantized weights) and
    oneDNN-packed weights (gemm.PackedLinear keeps them as non-persistent buffers: a state_dict cannot hold
    them); not other non-persistent buffers such as rotary tables or adapter slots."""
    tensors = list(model.parameters())
    for module in model.modules():
        skip = module._non_persistent_buffers_set
        tensors += [b for name, b in module._buffers.items() if b is not None and (name not in skip or b.is_mkldnn)]
    return sum(t.numel() * t.element_size() for t in tensors)
