"""Read and validate PEFT adapter directories into host-side AdapterWeights.

Supported: LoRA (incl. rsLoRA, rank_pattern/alpha_pattern, fan_in_fan_out: PEFT stores A/B the same way, the
wrapper handles Conv1D bases), DoRA (use_dora), AdaLoRA, IA3.
Only ``adapter_model.safetensors`` is ever read: pickled ``.bin``/``.pt`` files are refused, never unpickled.
Every refusal is an AdapterFormatError naming the file and the reason; nothing is half-loaded, because the
result is only built after every check passed.
"""
from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from server.errors import AdapterError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# PEFT config switches whose semantics we do not implement; an adapter that turns one on is refused, not
# silently served wrong.
_UNSUPPORTED_FLAGS = ("lora_bias", "use_qalora", "layer_replication", "trainable_token_indices",
                      "alora_invocation_tokens", "target_parameters", "use_bdlora")


class AdapterFormatError(AdapterError):
    """An adapter directory we refuse to load; the message names the file and the reason."""


@dataclass
class ModuleWeights:
    """One targeted linear module's adapter tensors, on host, as PEFT stores them.

    LoRA family: a [r, in], b [out, r], delta = scaling * b @ a @ x; DoRA adds magnitude [out].
    IA3: ia3 [out] scales the output, or [in] scales the input when ``ia3_on_input`` (feedforward_modules).
    """

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    scaling: float = 1.0
    magnitude: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    ia3_on_input: bool = False
    dora_scale: torch.Tensor | None = None  # m / ||W + s*B@A||, filled once per adapter on first activation
    slot_b: torch.Tensor | None = None  # [r, out] B.T with scaling (and DoRA's d) folded in, cached likewise

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[0]


@dataclass
class PackedBank:
    """One adapter's tensors for one bank of same-shaped base layers (see server.layers.slot_bank), stacked so
    a device-slot fill is one copy per tensor kind for the whole bank, not one per layer.

    positions: the bank members this adapter targets (indices into the bank's layer list), ascending.
    index:     the same as a long tensor, or None when the adapter targets every member in order.
    ranks:     each targeted member's own rank (rows up to ``a.shape[1]`` beyond it are zero).
    a [n, r, in], b [n, r, out] (B transposed, scaling folded in): LoRA/AdaLoRA; ia3 [n, dim]: IA3.
    """

    positions: list[int]
    index: torch.Tensor | None
    ranks: list[int]
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    ia3: torch.Tensor | None = None
    ia3_on_input: bool = False
    modules: list[str] = field(default_factory=list)  # the module path of each position

    @property
    def rank(self) -> int:
        return 0 if self.a is None else self.a.shape[1]


@dataclass
class AdapterWeights:
    """A whole adapter on host: ``modules`` maps a base-model module path to its tensors; ``packed`` (after
    ``prepare_slots`` with a bank layout) holds the same tensors stacked per bank, ``modules`` viewing into it."""

    name: str
    peft_type: str  # LORA | ADALORA | IA3
    use_dora: bool
    modules: dict[str, ModuleWeights]
    path: str
    base_model_name_or_path: str | None = None
    config: dict = field(default_factory=dict)
    packed: dict[int, PackedBank] = field(default_factory=dict)  # bank number -> stacked tensors
    _nbytes: int | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return "dora" if self.use_dora else self.peft_type.lower()

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Host bytes held (packed tensors plus per-module tensors that are not views into them). Computed
        once by prepare_slots, counting the slot-ready B a DoRA module builds at its first activation: the
        host tier sums this over every entry whenever a request finishes, so it must cost nothing."""
        if self._nbytes is None:
            return self._count_bytes()
        return self._nbytes

    def _count_bytes(self) -> int:
        packed = [t for p in self.packed.values() for t in (p.a, p.b, p.ia3) if t is not None]
        shared = self._packed_storages()
        own = [t for m in self.modules.values() for t in (m.a, m.b, m.slot_b, m.magnitude, m.ia3)
               if t is not None and t.untyped_storage().data_ptr() not in shared]
        dora_slot_b = sum(m.b.numel() * 4 for m in self.modules.values() if m.magnitude is not None
                          and m.slot_b is None)
        return sum(t.numel() * t.element_size() for t in packed + own) + dora_slot_b

    def prepare_slots(self, banks: list[list[str]] | None = None) -> None:
        """Make the adapter slot-ready: B transposed with its scaling folded in, stacked per bank of the
        device layout (``banks``: each bank's member module paths, in bank order) where every targeted member
        of a bank is the same kind (plain LoRA/AdaLoRA, or IA3 on the same side). DoRA waits: its factor
        needs the base weight, so it is built per layer at first activation (AdapterLinear.set_slot).
        Afterwards no tensor views the file buffer the adapter was read into, so that buffer is freed."""
        for number, paths in enumerate(banks or ()):
            present = [(pos, p, self.modules[p]) for pos, p in enumerate(paths) if p in self.modules]
            packed = _pack(present) if present else None
            if packed is not None:
                self.packed[number] = packed
        packed = self._packed_storages()
        for m in self.modules.values():
            if m.a is not None and m.magnitude is None and m.slot_b is None:
                m.slot_b = (m.b.float().T * m.scaling).contiguous()  # [r, out]
                m.b = None
            for part in ("a", "b", "magnitude", "ia3"):
                t = getattr(m, part)
                if t is not None and t.untyped_storage().data_ptr() not in packed and \
                        t.untyped_storage().nbytes() != t.numel() * t.element_size():
                    setattr(m, part, t.clone())  # a view into the file buffer: own it
        self._nbytes = self._count_bytes()

    # ---- the prepared form: how a loader process hands a slot-ready adapter over (one file, one read) ----
    def save_prepared(self, path: Path) -> dict:
        """Write the prepared tensors to one safetensors file; returns the metadata load_prepared needs."""
        from safetensors.torch import save_file

        tensors, banks, in_bank = {}, {}, set()
        for number, pb in self.packed.items():
            for part in ("a", "b", "ia3", "index"):
                if getattr(pb, part) is not None:
                    tensors[f"packed.{number}.{part}"] = getattr(pb, part)
            banks[number] = {"positions": pb.positions, "ranks": pb.ranks, "ia3_on_input": pb.ia3_on_input,
                             "modules": pb.modules}
            in_bank.update(pb.modules)
        modules = {}
        for module, m in self.modules.items():
            modules[module] = {"scaling": m.scaling, "ia3_on_input": m.ia3_on_input}
            if module not in in_bank:
                for part in ("a", "b", "slot_b", "magnitude", "ia3"):
                    if getattr(m, part) is not None:
                        tensors[f"module.{module}.{part}"] = getattr(m, part).contiguous()
        save_file(tensors, str(path))
        return {"name": self.name, "peft_type": self.peft_type, "use_dora": self.use_dora, "path": self.path,
                "base_model_name_or_path": self.base_model_name_or_path, "config": self.config,
                "nbytes": self.nbytes, "banks": banks, "modules": modules}

    @classmethod
    def load_prepared(cls, path: Path, meta: dict) -> "AdapterWeights":
        """Inverse of save_prepared: one read; every tensor, per module too, is a view into that buffer."""
        t = read_safetensors(path, path.stat().st_size)
        modules = {m: ModuleWeights(scaling=v["scaling"], ia3_on_input=v["ia3_on_input"])
                   for m, v in meta["modules"].items()}
        packed = {}
        for number, b in meta["banks"].items():
            pb = PackedBank(b["positions"], t.get(f"packed.{number}.index"), b["ranks"],
                            a=t.get(f"packed.{number}.a"), b=t.get(f"packed.{number}.b"),
                            ia3=t.get(f"packed.{number}.ia3"), ia3_on_input=b["ia3_on_input"],
                            modules=b["modules"])
            packed[int(number)] = pb
            for i, (module, r) in enumerate(zip(pb.modules, pb.ranks)):
                mw = modules[module]
                if pb.a is not None:
                    mw.a, mw.slot_b = pb.a[i, :r], pb.b[i, :r]
                else:
                    mw.ia3 = pb.ia3[i]
        for key, tensor in t.items():
            if key.startswith("module."):
                module, _, part = key[len("module."):].rpartition(".")
                setattr(modules[module], part, tensor)
        w = cls(meta["name"], meta["peft_type"], meta["use_dora"], modules, meta["path"],
                meta["base_model_name_or_path"], meta["config"], packed)
        w._nbytes = meta["nbytes"]
        return w

    def _packed_storages(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for p in self.packed.values() for t in (p.a, p.b, p.ia3)
                if t is not None}


def _pack(present: list[tuple[int, str, ModuleWeights]]) -> PackedBank | None:
    """Stack one bank's modules (a few ops for the whole bank), or None when they are not all one packable kind
    (then the bank is filled layer by layer)."""
    positions = [pos for pos, _, _ in present]
    paths = [path for _, path, _ in present]
    mws = [m for _, _, m in present]
    index = None if positions == list(range(len(positions))) else torch.tensor(positions, dtype=torch.long)
    if all(m.ia3 is not None for m in mws):
        if len({m.ia3_on_input for m in mws}) != 1 or len({m.ia3.shape for m in mws}) != 1:
            return None
        ia3 = torch.stack([m.ia3 for m in mws])  # [n, dim]
        for i, m in enumerate(mws):
            m.ia3 = ia3[i]
        return PackedBank(positions, index, [0] * len(mws), ia3=ia3, ia3_on_input=mws[0].ia3_on_input,
                          modules=paths)
    if not all(m.a is not None and m.magnitude is None and m.slot_b is None for m in mws):
        return None
    ranks = [m.rank for m in mws]
    r = max(ranks)  # lower ranks (rank_pattern) are zero-padded up to it
    a = torch.stack([m.a if m.rank == r else F.pad(m.a, (0, 0, 0, r - m.rank)) for m in mws])  # [n, r, in]
    b = torch.stack([m.b if m.rank == r else F.pad(m.b, (0, r - m.rank)) for m in mws]).float()  # [n, out, r]
    scalings = {m.scaling for m in mws}
    scale = scalings.pop() if len(scalings) == 1 else torch.tensor([m.scaling for m in mws]).view(-1, 1, 1)
    b = (b.transpose(1, 2) * scale).contiguous()  # [n, r, out]
    for i, m in enumerate(mws):
        m.a, m.slot_b, m.b = a[i, :ranks[i]], b[i, :ranks[i]], None
    return PackedBank(positions, index, ranks, a=a, b=b, modules=paths)


def _pattern_value(patterns: dict | None, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: first key that matches a suffix of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{path}: missing; a PEFT adapter directory needs {CONFIG_FILE}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: must be a JSON object")
    return config


def read_safetensors(path: Path, max_bytes: int) -> dict[str, torch.Tensor]:
    """Validate the header, then read the data in one call; every tensor is a view into that one buffer.

    No per-tensor file access and little Python per tensor: a load runs on a thread beside the step loop, and
    every Python bytecode it runs is GIL time the running streams wait for.
    """
    header, data_start = check_safetensors_header(path, max_bytes)
    buf = torch.empty(path.stat().st_size - data_start, dtype=torch.uint8)  # not zero-filled: read over
    with path.open("rb") as f:
        f.seek(data_start)
        if f.readinto(memoryview(buf.numpy())) != len(buf):
            raise AdapterFormatError(f"{path}: file changed while being read")
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = buf[start:end]
        if start % dtype.itemsize:
            raw = raw.clone()  # unaligned (old writers did not pad the header): view a copy instead
        tensors[key] = raw.view(dtype).view(info["shape"])
    return tensors


def check_safetensors_header(path: Path, max_bytes: int) -> tuple[dict, int]:
    """Validate the header before any tensor is read: sizes, offsets and dtypes must be consistent.
    Returns the header and the file offset where tensor data starts."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterFormatError(f"{path}: {size} bytes exceeds the {max_bytes}-byte adapter limit")
    with path.open("rb") as f:
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
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise AdapterFormatError(f"{path}: safetensors __metadata__ must map strings to strings")
            continue
        try:
            start, end = info["data_offsets"]
            numel = math.prod(info["shape"])
            itemsize = _DTYPES[info["dtype"]].itemsize
            if not all(isinstance(v, int) and v >= 0 for v in (start, end, *info["shape"])):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AdapterFormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if not (0 <= start <= end <= data_len) or numel * itemsize != end - start:
            raise AdapterFormatError(
                f"{path}: tensor {key!r} claims {numel * itemsize} bytes at {start}..{end} but the file holds "
                f"{data_len} data bytes; file is corrupt or truncated")
    return header, 8 + n


def _check_config(config: dict, path: Path) -> str:
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
    return peft_type


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
                    path: Path) -> ModuleWeights:
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
    cfg_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
    if cfg_r != r:
        raise AdapterFormatError(f"{path}: {module}: tensors have rank {r} but the config says r={cfg_r!r}")
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    magnitude = t.get("lora_magnitude_vector")
    if config.get("use_dora") and (magnitude is None or tuple(magnitude.shape) != (b.shape[0],)):
        raise AdapterFormatError(f"{path}: {module}: use_dora needs lora_magnitude_vector of shape [{b.shape[0]}]")
    return ModuleWeights(a=a, b=b, scaling=scaling, magnitude=magnitude if config.get("use_dora") else None)


def load_adapter_dir(directory: str | Path, name: str, max_bytes: int = 2 << 30) -> AdapterWeights:
    """Read a PEFT adapter directory. Raises AdapterFormatError; never unpickles."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: not a directory")
    config = read_config(directory)
    peft_type = _check_config(config, directory / CONFIG_FILE)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [p for p in PICKLE_FILES if (directory / p).exists()]
        why = (f"only pickle weights ({', '.join(pickles)}) found; pickles can run code and are never loaded, "
               "re-save the adapter with safe_serialization=True") if pickles else "missing"
        raise AdapterFormatError(f"{weights_path}: {why}")
    tensors = read_safetensors(weights_path, max_bytes)
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
    try:
        modules = {m: _module_weights(m, t, config, peft_type, weights_path) for m, t in grouped.items()}
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, re.error) as e:
        if isinstance(e, AdapterFormatError):
            raise
        raise AdapterFormatError(f"{directory / CONFIG_FILE}: invalid value in r/lora_alpha/init_r/rank_pattern/"
                                 f"alpha_pattern ({type(e).__name__}: {e})") from None
    return AdapterWeights(name=name, peft_type=peft_type, use_dora=bool(config.get("use_dora")),
                          modules=modules, path=str(directory),
                          base_model_name_or_path=config.get("base_model_name_or_path"), config=config)


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
