"""AdapterMerger: every method PEFT's add_weighted_adapter has, run on the weightless skeleton of the base, gives
exactly the adapter PEFT gives on the real model (DARE's random masks too, from the same seed); what PEFT refuses
is refused with PEFT's reason, and what PEFT would merge wrongly (DoRA, IA3, AdaLoRA) is refused up front."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from support import adapter_root
from server.adapters.merge import AdapterMerger, skeleton
from server.adapters.merge_spec import METHODS, MergeSpec
from server.adapters.store import AdapterStore
from server.config import EngineConfig
from server.errors import AdapterError, UnknownAdapterError

DENSITY = {m: 0.6 for m in METHODS if m not in ("linear", "cat", "svd")}


@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory):
    return adapter_root(adapters, tmp_path_factory.mktemp("merge-root"), {
        "a": "lora", "b": "lora2", "rs": "rslora", "dora": "dora", "ada": "adalora", "ia3": "ia3"})


@pytest.fixture(scope="module")
def merger(root, tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig

    config = EngineConfig(model=str(tiny_model_dir), adapter_roots=[str(root)], adapter_loader="thread")
    store = AdapterStore(config, {}, config.model)
    made = AdapterMerger(store, AutoConfig.from_pretrained(tiny_model_dir), tmp_path_factory.mktemp("merged"),
                         config.max_adapter_bytes)
    yield made
    made.close()
    store.close()


def peft_merge(model_dir, root, spec: MergeSpec) -> tuple[dict, dict]:
    """PEFT on the real base model: the sources loaded by PeftModel, then add_weighted_adapter after
    torch.manual_seed(seed). The merged adapter's tensors (PEFT's saved names) and config."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = [f"s{i}" for i in range(len(spec.sources))]
    model = PeftModel.from_pretrained(base, root / spec.sources[0][0], adapter_name=names[0])
    for name, (source, _) in zip(names[1:], spec.sources[1:]):
        model.load_adapter(root / source, adapter_name=name)
    torch.manual_seed(spec.seed or 0)
    model.add_weighted_adapter(names, [w for _, w in spec.sources], "m", **spec.peft_arguments())
    state = get_peft_model_state_dict(model, adapter_name="m", save_embedding_layers=False)
    return state, model.peft_config["m"].to_dict()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_the_skeleton_equals_peft_on_the_real_model(merger, root, tiny_model_dir, method):
    spec = MergeSpec(f"m-{method}", method, (("a", 0.7), ("b", -0.4)), density=DENSITY.get(method),
                     seed=5 if method.startswith("dare") else None)
    out = merger.merge(spec, merger.sources(spec))
    got = load_file(out / "adapter_model.safetensors")
    want, config = peft_merge(tiny_model_dir, root, spec)
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for key in want:
        assert torch.equal(got[key], want[key]), key
    saved = json.loads((out / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "use_rslora", "peft_type"):
        assert saved[field] == (config[field].value if field == "peft_type" else config[field]), field
    assert sorted(saved["target_modules"]) == sorted(config["target_modules"])


def test_dare_with_another_seed_draws_another_mask(merger):
    spec = MergeSpec("m-seed", "dare_linear", (("a", 0.5), ("b", 0.5)), density=0.5, seed=1)
    first = load_file(merger.merge(spec, merger.sources(spec)) / "adapter_model.safetensors")
    spec = MergeSpec("m-seed", "dare_linear", (("a", 0.5), ("b", 0.5)), density=0.5, seed=2)
    second = load_file(merger.merge(spec, merger.sources(spec)) / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_the_skeleton_holds_no_weight_memory(tiny_model_dir):
    from transformers import AutoConfig

    model = skeleton(AutoConfig.from_pretrained(tiny_model_dir))
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert list(storages.values()) == [4]  # one float32 scalar behind every weight
    assert all(p.device.type == "cpu" and p.stride() == (0,) * p.dim() for p in model.parameters())


def test_peft_refusals_come_back_with_peft_reason(merger):
    spec = MergeSpec("m-ranks", "ties", (("a", 0.5), ("rs", 0.5)), density=0.5)  # ranks 8 and 4
    with pytest.raises(AdapterError, match="PEFT's add_weighted_adapter refused.*same r value"):
        merger.merge(spec, merger.sources(spec))


@pytest.mark.parametrize("source, kind", [("dora", "DoRA"), ("ada", "AdaLoRA"), ("ia3", "IA3")])
def test_sources_peft_cannot_merge_exactly_are_refused(merger, source, kind):
    spec = MergeSpec("m-kind", "cat", (("a", 0.5), (source, 0.5)))
    with pytest.raises(AdapterError, match=f"'{source}' is {kind}: only LoRA and rsLoRA"):
        merger.merge(spec, merger.sources(spec))


def test_an_unknown_source_is_404_naming_it_and_nothing_is_registered(merger):
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        merger.sources(MergeSpec("m", "cat", (("a", 1.0), ("nope", 1.0))))
    assert merger.store.entries == {}


def test_prune_keeps_only_the_registered_version(merger):
    spec = MergeSpec("m-prune", "linear", (("a", 0.5), ("b", 0.5)))
    old, new = (merger.merge(spec, merger.sources(spec)) for _ in range(2))
    assert old != new and old.parent == new.parent
    merger.prune("m-prune", str(new))
    assert not old.exists() and new.exists()
    merger.prune("m-prune", None)
    assert not new.parent.exists()


def test_prune_keeps_every_version_still_loaded(merger):
    spec = MergeSpec("m-keep", "linear", (("a", 0.5), ("b", 0.5)))
    first, second, third = (merger.merge(spec, merger.sources(spec)) for _ in range(3))
    merger.prune("m-keep", [str(first), str(third)])  # e.g. an older version still addressable, and the current
    assert first.exists() and not second.exists() and third.exists()
