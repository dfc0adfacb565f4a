"""AdapterMerger: new adapters made from existing LoRA adapters by PEFT's own ``add_weighted_adapter`` (linear,
cat, svd, TIES, DARE, magnitude pruning and their SVD variants), on a worker thread of their own.

PEFT merges on a model, but only its adapter tensors take part: the result reads the sources' lora_A / lora_B,
their scalings, and for the *svd methods their deltas B @ A; never a base weight. So the model here is a
skeleton of the base: its modules built on the meta device from the served model's config, then every parameter
and buffer made a zero-filled stride-0 view of one scalar (shape, dtype and device are real; no memory). The
adapters attached to it are real tensors, read and checked like any load (formats.load_adapter_dir, the reads
held to the adapter roots). Peak memory is the sources' and the result's adapter tensors, not a second base (the
*svd methods also form each layer's full delta and its SVD, one layer at a time); this working memory is not
counted against --max-cpu-lora-bytes, the result is once the store loads it.
tests/adapters/test_merge.py checks, for every method, that the result equals PEFT's on the real model.

DARE draws random masks from torch's default CPU generator (``torch.bernoulli`` with no generator), so the
generator is seeded with ``seed`` right before ``add_weighted_adapter``, inside ``torch.random.fork_rng``:
``torch.manual_seed(seed)`` before PEFT's call gives the same adapter. Merges run one at a time.

Results are written in PEFT's format (adapter_config.json, adapter_model.safetensors) to
``<directory>/<name>/<merge id>/``, a fresh directory per merge, so replacing a merged adapter never rewrites
files an earlier version may still read; ``prune`` removes the versions no longer registered.
"""
from __future__ import annotations

import copy
import logging
import shutil
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from server.adapters.formats import KEY_PREFIX, WEIGHTS_FILE, load_adapter_dir
from server.adapters.merge_spec import MergeSpec
from server.adapters.store import AdapterStore, _lower_thread_priority
from server.adapters.weights import AdapterWeights
from server.config import valid_adapter_name
from server.errors import AdapterError, SwapserveError, UnknownAdapterError

log = logging.getLogger(__name__)
MERGED = "merged"  # the result's adapter name inside PEFT; sources are s0, s1, ... (adapter names may hold '.')

@dataclass(frozen=True)
class MergeSource:
    """A source adapter's local directory and what its reads must resolve under (None: trusted)."""

    name: str
    source: str  # a directory, or "hub:org/name[@revision]" (fetched on the merge thread)
    roots: list[str] | None
    content_hash: str | None = None  # the version the name serves (hex), when registered: what the read must be


class AdapterMerger:
    def __init__(self, store: AdapterStore, model_config, directory: str | Path, max_bytes: int):
        """model_config: the served base model's Hugging Face config (the skeleton's architecture);
        directory: where merged adapters are written; max_bytes: --max-adapter-bytes for each source read."""
        self.store = store
        self.model_config = model_config
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-merge",
                                           initializer=_lower_thread_priority)

    def sources(self, spec: MergeSpec) -> list[MergeSource]:
        """Where each source of ``spec`` is read from: a registered adapter, or a name an adapter root or the
        allowed Hub would serve on demand (nothing is registered here). 404 naming the first unknown one."""
        found = []
        for name, _ in spec.sources:
            with self.store.lock:
                entry = self.store.entries.get(name)
            source, trusted = (entry.source, entry.trusted) if entry else (self.store.sources.on_demand(name), False)
            if source is None:
                raise UnknownAdapterError(f"merge source {name!r} does not exist (not loaded, and not under an "
                                          "--adapter-root)", param="sources")
            roots = self.store.sources.roots_for(source, trusted)
            served = entry.content_hash.hex() if entry is not None and entry.content is not None else None
            found.append(MergeSource(name, source, None if roots is None else [str(r) for r in roots], served))
        return found

    def submit(self, spec: MergeSpec, sources: list[MergeSource]) -> Future:
        """Merge on the merge thread; the future's result is the new adapter's directory."""
        return self.executor.submit(self.merge, spec, sources)

    def merge(self, spec: MergeSpec, sources: list[MergeSource]) -> Path:
        try:
            model = self._peft_model(sources)
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:
            if isinstance(exc, SwapserveError):
                raise
            raise AdapterError(f"PEFT could not build the merge's sources ({', '.join(s.name for s in sources)}) from "
                               f"their configs: {type(exc).__name__}: {exc}", param="sources") from None
        names = [f"s{i}" for i in range(len(sources))]
        try:
            with torch.random.fork_rng(devices=[]):
                if spec.seed is not None:
                    torch.default_generator.manual_seed(spec.seed)
                model.add_weighted_adapter(names, [w for _, w in spec.sources], MERGED, **spec.peft_arguments())
        except (ValueError, TypeError, RuntimeError) as exc:
            raise AdapterError(f"PEFT's add_weighted_adapter refused the {spec.method} merge of "
                               f"{', '.join(n for n, _ in spec.sources)}: {exc}", param="method") from None
        return self._save(model, spec.name)

    def _peft_model(self, sources: list[MergeSource]):
        """A PeftModel over the skeleton holding every source as s0, s1, ... (loaded as PEFT loads them)."""
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

        model = None
        for i, src in enumerate(sources):
            directory = self.store.sources.materialize(src.source)
            weights = load_adapter_dir(directory, src.name, self.max_bytes, roots=src.roots)
            if src.content_hash is not None and weights.content_hash != src.content_hash:
                raise AdapterError(f"merge source {src.name!r}: its files changed since the version it serves "
                                   f"({src.content_hash[:12]}) was loaded, so the merge would not be of what it "
                                   "serves; reload it first (or restore its files)", param="sources")
            _check_mergeable(weights)
            config = PeftConfig.from_peft_type(**{**weights.config, "inference_mode": True})
            if model is None:
                model = get_peft_model(skeleton(self.model_config), config, adapter_name=f"s{i}")
            else:
                model.add_adapter(f"s{i}", config)
            state = {f"{KEY_PREFIX}{m}.lora_{ab}.weight": getattr(mw, ab.lower())
                     for m, mw in weights.modules.items() for ab in "AB"}
            unplaced = set(set_peft_model_state_dict(model, state, adapter_name=f"s{i}").unexpected_keys)
            if unplaced:
                raise AdapterError(f"{directory / WEIGHTS_FILE}: PEFT places no module for {sorted(unplaced)[0]} "
                                   "under this adapter's target_modules; it cannot be merged", param="sources")
        return model

    def _save(self, model, name: str) -> Path:
        """PEFT's files of the merged adapter (what save_pretrained writes, without its model card or the Hub
        look-ups it makes for embedding layers), in a fresh directory."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        out = self.directory / name / uuid.uuid4().hex[:12]
        partial = out.with_name(f".partial-{out.name}")
        partial.mkdir(parents=True)
        try:
            state = get_peft_model_state_dict(model, adapter_name=MERGED, save_embedding_layers=False)
            save_file({k: v.detach().contiguous() for k, v in state.items()}, partial / WEIGHTS_FILE,
                      metadata={"format": "pt"})
            config = copy.deepcopy(model.peft_config[MERGED])
            config.inference_mode = True
            config.save_pretrained(str(partial))
            partial.rename(out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return out

    def prune(self, name: str, keep: str | list[str] | None) -> None:
        """Remove the merged directories of ``name`` other than ``keep`` (the one registered, or each of the
        name's loaded versions: an older one is still addressable as name@version and may be rolled back to)."""
        if not valid_adapter_name(name):  # merged adapters have plain names; a Hub id's '/' must not reach in
            return
        parent = self.directory / name
        kept = {Path(k).resolve() for k in ([keep] if isinstance(keep, str) else keep or [])}
        for version in parent.glob("*") if parent.is_dir() else ():
            if version.resolve() not in kept:
                shutil.rmtree(version, ignore_errors=True)
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()

    def on_version_forgotten(self, name: str, source: str) -> None:
        """Store observer: an older version of ``name`` left host memory and was forgotten (its reads of
        ``source`` are over). A merged one's directory is deleted on the merge thread (prune runs only on merges
        and unloads: evicted versions' files stayed until then)."""
        directory = Path(source)
        if valid_adapter_name(name) and directory.parent == self.directory / name:
            self.executor.submit(self._discard, name, directory)

    def _discard(self, name: str, directory: Path) -> None:
        if str(directory) in self.store.sources_of(name):  # loaded again meanwhile (a rollback cannot: forgotten)
            return
        shutil.rmtree(directory, ignore_errors=True)
        parent = directory.parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


KIND_NAMES = {"dora": "DoRA", "adalora": "AdaLoRA", "ia3": "IA3"}


def _check_mergeable(weights: AdapterWeights) -> None:
    """LoRA and rsLoRA only: PEFT itself refuses AdaLoRA ("does not support add_weighted_adapter") and cannot hold
    it beside LoRA; its IA3 merge is another method; for DoRA it merges lora_A / lora_B only and gives the result
    a magnitude from the base weights, keeping none of the sources' magnitude vectors."""
    if weights.kind != "lora":
        raise AdapterError(f"merge source {weights.name!r} is {KIND_NAMES.get(weights.kind, weights.kind)}: only "
                           "LoRA and rsLoRA adapters can be merged (PEFT's add_weighted_adapter does not support "
                           "AdaLoRA, merges IA3 by another method, and keeps no DoRA magnitude)", param="sources")


def skeleton(model_config) -> torch.nn.Module:
    """The base model's module tree without its weights: built on the meta device, then every parameter and
    buffer a zero view of one float32 scalar, expanded to its shape (stride 0: no memory) on the CPU."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is never quantized: PEFT sees plain Linear layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    zero = torch.zeros((), dtype=torch.float32)
    for module in model.modules():
        for key, param in list(module.named_parameters(recurse=False)):
            setattr(module, key, torch.nn.Parameter(zero.expand(param.shape), requires_grad=False))
        for key, buffer in list(module.named_buffers(recurse=False)):
            module.register_buffer(key, torch.zeros((), dtype=buffer.dtype).expand(buffer.shape), persistent=False)
    return model.eval()
