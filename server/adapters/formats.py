"""Read and validate PEFT adapter directories into host-side AdapterWeights.

Supported: LoRA (incl. rsLoRA, rank_pattern/alpha_pattern, fan_in_fan_out: PEFT stores A/B the same way, the
wrapper handles Conv1D bases), DoRA (use_dora), AdaLoRA, IA3.
Only ``adapter_model.safetensors`` is ever read: pickled ``.bin``/``.pt`` files are refused, never unpickled.
Every refusal is an AdapterFormatError naming the file and the reason; nothing is half-loaded, because the
result is only built after every check passed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import struct
import time
from pathlib import Path
from typing import BinaryIO

import regex
import torch

from server.adapters.adapter_dir import AdapterDir
from server.adapters.weights import AdapterWeights
from server.errors import AdapterError
from server.layers.host_weights import ModuleWeights

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# PEFT config switches whose semantics we do not implement; an adapter that turns one on is refused, not
# silently served wrong.
_UNSUPPORTED_FLAGS = ("lora_bias", "use_qalora", "layer_replication", "trainable_token_indices",
                      "alora_invocation_tokens", "target_parameters", "use_bdlora")


# init_lora_weights whose saved adapter only reproduces the fine-tuned model over a base PEFT modifies at load
# (PiSSA, OLoRA, CorDA subtract their initial factors from the base weights); converted ones save "True"
_BASE_CHANGING_INITS = ("pissa", "olora", "corda")


class AdapterFormatError(AdapterError):
    """An adapter directory we refuse to load; the message names the file and the reason."""


PATTERN_BUDGET_S = 1.0  # all of one adapter's rank_pattern / alpha_pattern matching
MAX_PATTERN_CHARS = 1024


class _Patterns:
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that matches a suffix of the module
    path (``re.match(rf"(.*\.)?({key})$", module)``, PEFT's get_pattern_key). The keys are regular expressions
    from the adapter's own config, so a hostile one could backtrack for minutes (``(.+)+!`` doubles its time per
    character of a module name) in the one loader every tenant's loads go through: they are matched with the
    ``regex`` module under a time budget shared by every lookup of the adapter, and the adapter is refused
    past it."""

    def __init__(self, config: dict, field: str, path: Path, deadline: float) -> None:
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{path}: {field} must be an object of pattern -> value")
        self.field, self.path, self.deadline, self.items = field, path, deadline, []
        for key, value in patterns.items():
            if len(key) > MAX_PATTERN_CHARS:
                raise AdapterFormatError(f"{path}: {field} key longer than {MAX_PATTERN_CHARS} characters")
            try:
                self.items.append((regex.compile(rf"(.*\.)?({key})$"), value))
            except regex.error as e:
                raise AdapterFormatError(f"{path}: {field} key {key!r} is not a regular expression ({e})") from None

    def value(self, module: str, default):
        for pattern, value in self.items:
            try:
                if pattern.match(module, timeout=max(self.deadline - time.monotonic(), 1e-3)):
                    return value
            except TimeoutError:
                raise AdapterFormatError(f"{self.path}: matching {self.field} against the module names took over "
                                         f"{PATTERN_BUDGET_S:g} s (a pattern that backtracks without end?); use "
                                         "plain module-name suffixes") from None
        return default


def read_config(directory: AdapterDir) -> dict:
    path = directory.path / CONFIG_FILE
    f = directory.open(CONFIG_FILE)
    if f is None:
        raise AdapterFormatError(f"{path}: missing; a PEFT adapter directory needs {CONFIG_FILE}")
    with f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: must be a JSON object")
    return config


def read_safetensors(path: Path, max_bytes: int, mapped: bool = False, file: BinaryIO | None = None,
                     digest=None) -> dict[str, torch.Tensor]:
    """Validate the header, then read the data in one call; every tensor is a view into that one buffer.

    No per-tensor file access and little Python per tensor: a load runs on a thread beside the step loop, and
    every Python bytecode it runs is GIL time the running streams wait for.

    mapped: map the file (private, copy-on-write) instead of reading it, so a file in the page cache is not
    copied at all: packing reads the cached pages directly. Only the load worker process maps: a file
    truncated while mapped kills whoever touches the lost pages (SIGBUS), and that must never be the server.
    file: ``path`` already open (AdapterDir.open, which checked where it resolves); it is closed here. Header
    and data come from this one open file, so they cannot come from two different files.
    digest: a hashlib object fed the tensors' header and bytes (the adapter's content hash).
    """
    with file or path.open("rb") as f:
        header, data_start = check_safetensors_header(f, path, max_bytes)
        size = os.fstat(f.fileno()).st_size
        if mapped:
            buf = torch.frombuffer(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY), dtype=torch.uint8)
            buf = buf[data_start:]
        else:
            buf = torch.empty(size - data_start, dtype=torch.uint8)  # not zero-filled: read over
            f.seek(data_start)
            if f.readinto(memoryview(buf.numpy())) != len(buf):
                raise AdapterFormatError(f"{path}: file changed while being read")
    if digest is not None:
        digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        digest.update(memoryview(buf.numpy()))
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        raw = buf[start:end]
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # unaligned (old writers did not pad the header): view a copy instead
        tensors[key] = raw.view(dtype).view(info["shape"])
    return tensors


def check_safetensors_header(f: BinaryIO, path: Path, max_bytes: int) -> tuple[dict, int]:
    """Validate the header of the open file ``f`` (``path``: its name in messages) before any tensor is read:
    sizes, offsets and dtypes must be consistent, and the tensors must tile the data section exactly (the
    safetensors rule: no overlap, which would alias two tensors' memory, and no hole, where other content could
    hide). Returns the header and the file offset where tensor data starts."""
    size = os.fstat(f.fileno()).st_size
    if size > max_bytes:
        raise AdapterFormatError(f"{path}: {size} bytes exceeds the {max_bytes}-byte adapter limit")
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise AdapterFormatError(f"{path}: truncated safetensors file (no header)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFormatError(f"{path}: safetensors header claims {n} bytes; file is corrupt or truncated")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFormatError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: safetensors header must be a JSON object")
    data_len = size - 8 - n
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise AdapterFormatError(f"{path}: safetensors __metadata__ must map strings to strings")
            continue
        try:
            start, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            itemsize = DTYPES[info["dtype"]].itemsize
            if not all(isinstance(v, int) and v >= 0 for v in (start, end, *info["shape"])):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if not (0 <= start <= end <= data_len) or numel * itemsize != end - start:
            raise AdapterFormatError(
                f"{path}: tensor {key!r} claims {numel * itemsize} bytes at {start}..{end} but the file holds "
                f"{data_len} data bytes; file is corrupt or truncated")
        spans.append((start, end, key))
    at = 0
    for start, end, key in sorted(spans):
        if start != at:
            raise AdapterFormatError(f"{path}: tensor {key!r} starts at byte {start} where {at} was expected (tensors "
                                     "overlap or leave a hole in the data); file is corrupt or crafted")
        at = end
    if at != data_len:
        raise AdapterFormatError(f"{path}: the tensors cover {at} of the file's {data_len} data bytes; file is corrupt "
                                 "or crafted")
    return header, 8 + n


def check_config(config: dict, path: Path) -> str:
    """The config's peft_type (LORA, ADALORA, IA3) if the server can serve it; AdapterFormatError naming the field
    otherwise."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "ADALORA", "IA3"):
        raise AdapterFormatError(
            f"{path}: peft_type {config.get('peft_type')!r} is not supported (supported: LORA, ADALORA, IA3)")
    if config.get("modules_to_save"):
        raise AdapterFormatError(
            f"{path}: modules_to_save={config['modules_to_save']} replaces whole base modules per adapter; "
            "this server keeps one shared base model and refuses such adapters")
    if config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{path}: bias={config['bias']!r} trains base biases; only bias='none' is served")
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise AdapterFormatError(f"{path}: {flag}={config[flag]!r} is not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterFormatError(
            f"{path}: init_lora_weights={init!r}: PEFT rebuilds the base weights from this adapter's initial "
            "factors when it loads one (the adapter changes the base, not only adds a delta), which one shared base "
            "cannot serve; convert it to a plain LoRA first (PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and load the result")
    return peft_type


def _read_weights(directory: AdapterDir, max_bytes: int, mapped: bool, digest) -> dict[str, torch.Tensor]:
    path = directory.path / WEIGHTS_FILE
    f = directory.open(WEIGHTS_FILE)
    if f is None:
        pickles = [p for p in PICKLE_FILES if directory.exists(p)]
        why = (f"only pickle weights ({', '.join(pickles)}) found; pickles can run code and are never loaded, "
               "re-save the adapter with safe_serialization=True") if pickles else "missing"
        raise AdapterFormatError(f"{path}: {why}")
    return read_safetensors(path, max_bytes, mapped, file=f, digest=digest)


def _split_key(key: str, path: Path) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A.weight' -> ('<module>', 'lora_A')."""
    if not key.startswith(KEY_PREFIX):
        raise AdapterFormatError(f"{path}: unexpected tensor name {key!r} (expected the {KEY_PREFIX!r} prefix)")
    parts = key[len(KEY_PREFIX):].split(".")
    if parts[-1] == "weight":
        parts = parts[:-1]
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        raise AdapterFormatError(f"{path}: {key!r} is an embedding LoRA, which is not supported")
    part = parts[-1]
    if part not in ("lora_A", "lora_B", "lora_E", "lora_magnitude_vector", "ia3_l"):
        raise AdapterFormatError(f"{path}: tensor {key!r} is not a LoRA/AdaLoRA/DoRA/IA3 weight")
    return ".".join(parts[:-1]), part


def _module_weights(module: str, t: dict[str, torch.Tensor], config: dict, peft_type: str,
                    path: Path, patterns: tuple[_Patterns, _Patterns]) -> ModuleWeights:
    if peft_type == "IA3":
        ia3 = t.get("ia3_l")
        if ia3 is None or ia3.dim() != 2 or 1 not in ia3.shape:
            raise AdapterFormatError(f"{path}: {module}.ia3_l missing or not a [n,1]/[1,n] vector")
        return ModuleWeights(ia3=ia3.flatten(), ia3_on_input=ia3.shape[0] == 1)
    a, b = t.get("lora_A"), t.get("lora_B")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterFormatError(f"{path}: {module}: lora_A/lora_B missing or of inconsistent rank "
                                 f"({None if a is None else tuple(a.shape)} vs {None if b is None else tuple(b.shape)})")
    r = a.shape[0]
    if peft_type == "ADALORA":
        e = t.get("lora_E")
        if e is None or tuple(e.shape) != (r, 1):
            raise AdapterFormatError(f"{path}: {module}.lora_E missing or not [{r}, 1]")
        init_r = int(config.get("init_r", r))
        alpha = config.get("lora_alpha") or init_r
        return ModuleWeights(a=a * e, b=b, scaling=alpha / (init_r + 1e-5))
    ranks, alphas = patterns
    cfg_r = ranks.value(module, config.get("r", r))
    if cfg_r != r:
        raise AdapterFormatError(f"{path}: {module}: tensors have rank {r} but the config says r={cfg_r!r}")
    alpha = alphas.value(module, config.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = t.get("lora_magnitude_vector")
    if config.get("use_dora") and (magnitude is None or tuple(magnitude.shape) != (b.shape[0],)):
        raise AdapterFormatError(f"{path}: {module}: use_dora needs lora_magnitude_vector of shape [{b.shape[0]}]")
    return ModuleWeights(a=a, b=b, scaling=scaling, magnitude=magnitude if config.get("use_dora") else None)


def config_kind(directory: str | Path, roots: list[str] | None = None) -> str:
    """The kind (AdapterWeights.kind: lora, adalora, dora, ia3) the adapter directory's config declares, read
    without its weights; AdapterFormatError for a config that would not load, OSError when the directory cannot be
    opened. ``roots``: as for load_adapter_dir."""
    directory = Path(directory)
    with AdapterDir(directory, roots) as opened:
        config = read_config(opened)
    peft_type = check_config(config, directory / CONFIG_FILE)
    return "dora" if config.get("use_dora") else peft_type.lower()


def load_adapter_dir(directory: str | Path, name: str, max_bytes: int = 2 << 30, mapped: bool = False,
                     roots: list[str] | None = None) -> AdapterWeights:
    """Read a PEFT adapter directory (``mapped``: see read_safetensors). Raises AdapterFormatError; never
    unpickles. ``roots``: what the directory and its files must resolve under, checked on the open files
    (AdapterDir); None for an operator-given path."""
    directory = Path(directory)
    try:
        opened = AdapterDir(directory, roots)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise AdapterFormatError(f"{directory}: not a directory ({e.strerror})") from None
    except OSError as e:  # permissions, a symlink loop: still the caller's path to fix, not a server fault
        raise AdapterFormatError(f"{directory}: cannot be opened as an adapter directory ({e.strerror})") from None
    with opened:
        config = read_config(opened)
        peft_type = check_config(config, directory / CONFIG_FILE)
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
        tensors = _read_weights(opened, max_bytes, mapped, digest)
    weights_path = directory / WEIGHTS_FILE
    embedding = next((k for k in tensors if "lora_embedding_" in k), None)
    if embedding is not None:
        raise AdapterFormatError(f"{weights_path}: {embedding!r} is an embedding LoRA, which is not supported")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, part = _split_key(key, weights_path)
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{weights_path}: tensor {key!r} has non-float dtype {tensor.dtype}")
        grouped.setdefault(module, {})[part] = tensor
    if not grouped:
        raise AdapterFormatError(f"{weights_path}: holds no adapter tensors")
    config_path, deadline = directory / CONFIG_FILE, time.monotonic() + PATTERN_BUDGET_S
    try:
        patterns = (_Patterns(config, "rank_pattern", config_path, deadline),
                    _Patterns(config, "alpha_pattern", config_path, deadline))
        modules = {m: _module_weights(m, t, config, peft_type, weights_path, patterns) for m, t in grouped.items()}
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        if isinstance(e, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: invalid value in r/lora_alpha/init_r/rank_pattern/"
                                 f"alpha_pattern ({type(e).__name__}: {e})") from None
    return AdapterWeights(name=name, peft_type=peft_type, use_dora=bool(config.get("use_dora")),
                          modules=modules, path=str(directory),
                          base_model_name_or_path=config.get("base_model_name_or_path"), config=config,
                          content_hash=digest.hexdigest())


def check_against_base(weights: AdapterWeights, targets: dict[str, tuple[int, int]], max_rank: int,
                       base_model_name: str | None = None) -> None:
    """Every module must be a wrapped base layer with matching shapes; rank <= max_rank.

    targets: module path -> (in_features, out_features) of the wrapped layers.
    """
    where = Path(weights.path) / WEIGHTS_FILE
    for module, mw in weights.modules.items():
        if module not in targets:
            raise AdapterFormatError(
                f"{where}: targets {module!r}, which is not a linear layer this server can adapt "
                f"(adaptable: decoder linear layers such as {next(iter(targets), '?')})")
        fan_in, fan_out = targets[module]
        if mw.rank > max_rank:
            raise AdapterFormatError(f"{where}: {module} has rank {mw.rank} > --max-lora-rank {max_rank}")
        expect = {"a": (mw.rank, fan_in), "b": (fan_out, mw.rank), "magnitude": (fan_out,),
                  "ia3": ((fan_in,) if mw.ia3_on_input else (fan_out,))}
        for part, shape in expect.items():
            t = getattr(mw, part)
            if t is not None and tuple(t.shape) != shape:
                raise AdapterFormatError(
                    f"{where}: {module}.{part} has shape {tuple(t.shape)}, the base model needs {shape}")
    if base_model_name and weights.base_model_name_or_path and weights.base_model_name_or_path != base_model_name:
        log.warning("adapter %s was trained on %r, serving it on %r", weights.name,
                    weights.base_model_name_or_path, base_model_name)
