"""server.adapters.formats: real PEFT adapters parse to PEFT's own values; every hostile directory is refused
with an AdapterFormatError (HTTP 400) naming the file and the reason, and no pickle is ever unpickled."""
from __future__ import annotations

import json
import math
import pickle
import random
import re
import struct

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from server.adapters import formats
from server.adapters.formats import (CONFIG_FILE, PICKLE_FILES, WEIGHTS_FILE, AdapterFormatError,
                                     check_against_base, config_kind, load_adapter_dir, read_safetensors)
from server.errors import AdapterError

PREFIX = "base_model.model."
Q0 = PREFIX + "model.layers.0.self_attn.q_proj."  # tensor-name prefix of one module of the lora_dir fixture

def assert_refused(call, path, reason):
    with pytest.raises(AdapterFormatError) as info:
        call()
    err = info.value
    assert isinstance(err, AdapterError) and err.status_code == 400
    assert str(path) in str(err), f"message does not name {path}: {err}"
    assert re.search(reason, str(err)), f"message lacks reason {reason!r}: {err}"


# --- good adapters: parsed values equal the ones PEFT itself uses --------------------------------------------

GOOD = {  # id: (peft config, kind, rank, {module-path suffix: expected scaling}, first matching suffix wins)
    "lora": (lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "lora", 4,
             {"q_proj": 2.0, "v_proj": 2.0}),
    "rslora-patterns": (lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"q_proj": 2},
                                           alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"]),
                        "lora", 4, {"q_proj": 8 / math.sqrt(2), "v_proj": 3 / math.sqrt(4)}),
    "patterns-one-layer": (lambda: LoraConfig(r=4, lora_alpha=8, rank_pattern={"layers.0.self_attn.q_proj": 2},
                                              alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"]),
                           "lora", 4, {"layers.0.self_attn.q_proj": 4.0, "q_proj": 2.0, "v_proj": 0.75}),
    "dora": (lambda: LoraConfig(r=4, lora_alpha=16, use_dora=True, target_modules=["q_proj", "down_proj"]),
             "dora", 4, {"q_proj": 4.0, "down_proj": 4.0}),
    "adalora": (lambda: AdaLoraConfig(init_r=6, target_r=2, total_step=10, lora_alpha=12,
                                      target_modules=["q_proj", "up_proj"]),
                "adalora", 6, {"proj": 12 / (6 + 1e-5)}),
    "ia3": (lambda: IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "ia3", 0, {"proj": 1.0}),
}


@pytest.mark.parametrize("case", GOOD, ids=list(GOOD))
def test_good_adapter_matches_peft(case, make_adapter, base_targets):
    make_config, kind, rank, scalings = GOOD[case]
    directory, peft_model = make_adapter(make_config())
    weights = load_adapter_dir(directory, case)
    assert config_kind(directory) == weights.kind  # what a mixture is checked against before any load
    layers = {n[len(PREFIX):]: m for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert (weights.name, weights.kind, weights.rank, weights.path) == (case, kind, rank, str(directory))
    assert set(weights.modules) == set(layers) and len(layers) == 4
    for module, mw in weights.modules.items():
        peft_layer = layers[module]
        want = next(s for suffix, s in scalings.items() if module.endswith(suffix))
        assert mw.scaling == pytest.approx(want, rel=1e-9), module
        if kind == "ia3":
            assert mw.a is None and mw.b is None and mw.rank == 0
            assert mw.ia3_on_input == module.endswith("down_proj") == peft_layer.is_feedforward
            assert torch.equal(mw.ia3, peft_layer.ia3_l["default"].detach().flatten())
            continue
        lora_a = peft_layer.lora_A["default"]
        if kind == "adalora":  # a == lora_A * lora_E; PEFT scales by lora_alpha / (ranknum + 1e-5)
            assert torch.allclose(mw.a, lora_a.detach() * peft_layer.lora_E["default"].detach())
            assert torch.equal(mw.b, peft_layer.lora_B["default"].detach())
            assert mw.scaling == pytest.approx(
                peft_layer.scaling["default"] / (peft_layer.ranknum["default"].item() + 1e-5))
            continue
        assert torch.equal(mw.a, lora_a.weight.detach()) and torch.equal(mw.b, peft_layer.lora_B["default"].weight)
        assert mw.scaling == pytest.approx(peft_layer.scaling["default"], rel=1e-9)
        assert mw.rank == peft_layer.r["default"]
        if kind == "dora":
            assert mw.magnitude.shape == (mw.b.shape[0],)
            assert torch.equal(mw.magnitude, peft_layer.lora_magnitude_vector["default"].weight)
        else:
            assert mw.magnitude is None
    assert weights.nbytes > 0
    check_against_base(weights, base_targets, max_rank=max(rank, 1))  # fits the base exactly: no error


# --- the reader and host packing --------------------------------------------------------------------------

@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_reader_equals_safetensors(tmp_path, mapped):
    """Every dtype an adapter may be saved in reads back bit-exact, read or mapped (the load worker's way)."""
    gen = torch.Generator().manual_seed(0)
    sd = {f"t.{dt}": torch.randn(3, 5, generator=gen).to(dt)
          for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
    sd["t.scalar"], sd["t.empty"] = torch.tensor(2.5), torch.zeros(0, 4)
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    got, want = read_safetensors(path, 1 << 20, mapped), load_file(str(path))
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
def test_reader_unaligned_tensor(tmp_path, mapped):
    """A hand-written file whose F32 tensor starts at an odd byte offset still reads correctly (a copy)."""
    values = torch.arange(6, dtype=torch.float32)
    data = b"\x07" + values.numpy().tobytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(header({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                             "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1, 25]}}, data))
    got = read_safetensors(path, 1 << 20, mapped)
    assert got["a"].tolist() == [7] and torch.equal(got["b"], values.view(2, 3))


def test_packing_shares_storage_and_frees_the_file_buffer(make_adapter, base_targets):
    """prepare_slots with a bank layout stacks each bank's modules; the modules view into the stacks (no copy
    kept twice), B is pre-transposed and scaled, and no tensor keeps the file's read buffer alive."""
    directory, _ = make_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"layers.1.self_attn.q_proj": 2}))
    plain = load_adapter_dir(directory, "x")
    weights = load_adapter_dir(directory, "x")
    paths = sorted(weights.modules)
    q = [p for p in paths if p.endswith("q_proj")]
    v = [p for p in paths if p.endswith("v_proj")]
    weights.prepare_slots([["model.layers.0.mlp.up_proj"], q, ["unknown.module"] + v])
    assert set(weights.packed) == {1, 2}
    bank_q, bank_v = weights.packed[1], weights.packed[2]
    assert bank_q.index is None and bank_q.ranks == [4, 2] and bank_q.a.shape[:2] == (2, 4)
    assert bank_v.positions == [1, 2] and bank_v.index.tolist() == [1, 2]
    stacks = {t.untyped_storage().data_ptr() for b in (bank_q, bank_v) for t in (b.a, b.b)}
    for path, mw in weights.modules.items():
        ref = plain.modules[path]
        assert mw.b is None and mw.a.untyped_storage().data_ptr() in stacks
        assert torch.equal(mw.a, ref.a) and torch.equal(mw.slot_b, ref.b.T * ref.scaling), path
    assert not bank_q.a[1, 2:].any() and not bank_q.b[1, 2:].any(), "rank padding must be zero"
    file_bytes = sum(t.numel() * t.element_size() for t in load_file(str(directory / WEIGHTS_FILE)).values())
    padding = 2 * (bank_q.a.shape[2] + bank_q.b.shape[2]) * 4  # q of layer 1: 2 zero rows in a and in b
    assert weights.nbytes == file_bytes + padding


def test_packing_mixed_dtypes_promotes_never_truncates():
    """Modules of one bank saved in different float types stack in the type they all promote to."""
    from server.adapters.weights import AdapterWeights, ModuleWeights

    half, full = torch.randn(2, 3).half(), torch.randn(2, 3, dtype=torch.float64)
    w = AdapterWeights("x", "LORA", False, {"p": ModuleWeights(a=half, b=torch.ones(4, 2)),
                                            "q": ModuleWeights(a=full, b=torch.ones(4, 2))}, "/nowhere")
    w.prepare_slots([["p", "q"]])
    assert w.packed[0].a.dtype == torch.float64 and torch.equal(w.modules["q"].a, full)
    assert torch.equal(w.modules["p"].a, half.double())


# --- hostile directories, built by corrupting one thing in a valid LoRA ---------------------------------------

def edit_config(**changes):
    def mutate(d):
        path = d / CONFIG_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return mutate


def config_text(text):
    return lambda d: (d / CONFIG_FILE).write_text(text)


def weights_bytes(make):
    """make(original file bytes) -> the bytes to write instead."""
    def mutate(d):
        path = d / WEIGHTS_FILE
        path.write_bytes(make(path.read_bytes()))
    return mutate


def tensors(edit):
    """edit(state dict) -> the state dict to save instead."""
    def mutate(d):
        path = d / WEIGHTS_FILE
        save_file(edit(load_file(str(path))), str(path))
    return mutate


def header(obj, data=b""):
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def replace(key, value=None, rename=None):
    """Drop ``key``, or put it back transformed by ``value`` and/or under the name ``rename``."""
    def edit(sd):
        t = sd.pop(key)
        if value or rename:
            sd[rename or key] = value(t) if value else t
        return sd
    return edit


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
HOSTILE = [  # (id, mutate(dir), file named in the message, reason regex)
    ("missing-config", lambda d: (d / CONFIG_FILE).unlink(), CONFIG_FILE, "missing"),
    ("invalid-json", config_text("{'r': 4,"), CONFIG_FILE, "not valid JSON"),
    ("non-utf8-config", lambda d: (d / CONFIG_FILE).write_bytes(b"\xff\xfe{"), CONFIG_FILE, "not valid JSON"),
    ("non-object-json", config_text("[1, 2]"), CONFIG_FILE, "must be a JSON object"),
    ("prompt-tuning", edit_config(peft_type="PROMPT_TUNING"), CONFIG_FILE, "'PROMPT_TUNING' is not supported"),
    ("no-peft-type", edit_config(peft_type=None), CONFIG_FILE, "peft_type None is not supported"),
    ("modules-to-save", edit_config(modules_to_save=["lm_head"]), CONFIG_FILE, "modules_to_save"),
    ("bias-all", edit_config(bias="all"), CONFIG_FILE, "bias='all'"),
    ("bias-lora-only", edit_config(bias="lora_only"), CONFIG_FILE, "bias='lora_only'"),
    ("layer-replication", edit_config(layer_replication=[[0, 2]]), CONFIG_FILE, "layer_replication.*not supported"),
    ("lora-bias", edit_config(lora_bias=True), CONFIG_FILE, "lora_bias=True is not supported"),
    ("missing-weights", lambda d: (d / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "missing"),
    ("truncated-in-data", weights_bytes(lambda b: b[:len(b) // 2]), WEIGHTS_FILE, "corrupt or truncated"),
    ("truncated-in-header", weights_bytes(lambda b: b[:40]), WEIGHTS_FILE, "header claims"),
    ("truncated-no-length", weights_bytes(lambda b: b[:5]), WEIGHTS_FILE, "no header"),
    ("random-bytes", weights_bytes(lambda b: random.Random(0).randbytes(4096)), WEIGHTS_FILE, "corrupt"),
    ("huge-header-length", weights_bytes(lambda b: struct.pack("<Q", 2**63) + b"{}"), WEIGHTS_FILE, "header claims"),
    ("header-not-json", weights_bytes(lambda b: struct.pack("<Q", 4) + b"{abc"), WEIGHTS_FILE, "not valid JSON"),
    ("header-not-object", weights_bytes(lambda b: header([1])), WEIGHTS_FILE, "must be a JSON object"),
    ("tensor-larger-than-file", weights_bytes(lambda b: header(
        {Q0 + "lora_A.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}},
        b"\0" * 16)), WEIGHTS_FILE, "claims 4398046511104 bytes"),
    ("shape-disagrees-with-offsets", weights_bytes(lambda b: header(
        {Q0 + "lora_A.weight": {**F32_2x2, "shape": [4, 4]}}, b"\0" * 16)), WEIGHTS_FILE, "corrupt or truncated"),
    ("unknown-dtype", weights_bytes(lambda b: header({Q0 + "lora_A.weight": {**F32_2x2, "dtype": "Q4_K"}},
                                                    b"\0" * 16)), WEIGHTS_FILE, "malformed header entry"),
    ("no-offsets", weights_bytes(lambda b: header({Q0 + "lora_A.weight": {"dtype": "F32", "shape": [2]}})),
     WEIGHTS_FILE, "malformed header entry"),
    ("bad-metadata", weights_bytes(lambda b: header({"__metadata__": {"a": 1}, Q0 + "lora_A.weight": F32_2x2},
                                                    b"\0" * 16)), WEIGHTS_FILE, "__metadata__ must map strings"),
    # tensors must tile the data: two sharing bytes would alias each other's memory, a hole could hide content
    ("overlapping-tensors", weights_bytes(lambda b: header({Q0 + "lora_A.weight": F32_2x2,
                                                            Q0 + "lora_B.weight": F32_2x2}, b"\0" * 16)),
     WEIGHTS_FILE, "overlap or leave a hole"),
    ("hole-between-tensors", weights_bytes(lambda b: header({Q0 + "lora_A.weight": F32_2x2, Q0 + "lora_B.weight": {
        **F32_2x2, "data_offsets": [32, 48]}}, b"\0" * 48)), WEIGHTS_FILE, "starts at byte 32 where 16"),
    ("bytes-after-tensors", weights_bytes(lambda b: header({Q0 + "lora_A.weight": F32_2x2}, b"\0" * 32)),
     WEIGHTS_FILE, "cover 16 of the file's 32 data bytes"),
    ("no-tensors", weights_bytes(lambda b: header({"__metadata__": {"format": "pt"}})), WEIGHTS_FILE,
     "no adapter tensors"),
    ("int-tensor", tensors(replace(Q0 + "lora_A.weight", lambda t: t.to(torch.int32))), WEIGHTS_FILE, "non-float"),
    ("rank-mismatch", tensors(replace(Q0 + "lora_B.weight", lambda t: t[:, :3].contiguous())), WEIGHTS_FILE,
     r"inconsistent rank \(\(4, 32\) vs \(32, 3\)\)"),
    ("missing-lora-B", tensors(replace(Q0 + "lora_B.weight")), WEIGHTS_FILE, "lora_A/lora_B missing"),
    ("config-r-differs", edit_config(r=8), WEIGHTS_FILE, "q_proj: tensors have rank 4 but the config says r=8"),
    ("rank-pattern-differs", edit_config(rank_pattern={"v_proj": 2}), WEIGHTS_FILE, "v_proj: .*config says r=2"),
    ("foreign-prefix", tensors(replace(Q0 + "lora_A.weight", rename="model.layers.0.q_proj.lora_A.weight")),
     WEIGHTS_FILE, "unexpected tensor name"),
    ("unknown-part", tensors(replace(Q0 + "lora_A.weight", rename=Q0 + "lora_X.weight")), WEIGHTS_FILE,
     "not a LoRA/AdaLoRA/DoRA/IA3 weight"),
    ("embedding-keys", tensors(lambda sd: {**sd, PREFIX + "model.embed_tokens.lora_embedding_A": torch.ones(4, 128)}),
     WEIGHTS_FILE, "embedding LoRA"),
    ("dora-no-magnitude", edit_config(use_dora=True), WEIGHTS_FILE, r"use_dora needs lora_magnitude_vector of shape"),
    ("adalora-no-lora-E", edit_config(peft_type="ADALORA", init_r=4), WEIGHTS_FILE, r"lora_E missing or not \[4, 1\]"),
    ("ia3-given-lora", edit_config(peft_type="IA3"), WEIGHTS_FILE, "ia3_l missing"),
    ("deep-json-config", config_text("[" * 100_000), CONFIG_FILE, "not valid JSON"),
    ("deep-json-header", weights_bytes(lambda b: struct.pack("<Q", 100_000) + b"[" * 100_000),
     WEIGHTS_FILE, "not valid JSON"),
    ("r-as-string", edit_config(r="4"), WEIGHTS_FILE, "config says r='4'"),
    # PEFT rebuilds the base from these adapters' initial factors at load (W - A0 B0): not a delta over one base
    *[(f"unconverted-{init}", edit_config(init_lora_weights=init), CONFIG_FILE, "convert it to a plain LoRA")
      for init in ("pissa", "pissa_niter_4", "olora", "corda")],
    *[(f"config-{k}", edit_config(**{k: v}), CONFIG_FILE, k)
      for k, v in [("lora_alpha", "8"), ("lora_alpha", None), ("rank_pattern", ["q"]),
                   ("rank_pattern", {"(": 4}), ("alpha_pattern", {"[": 1})]],
    ("config-init_r", lambda d: (edit_config(peft_type="ADALORA", init_r="x")(d), tensors(lambda sd: {
        **sd, **{k.replace("lora_A.weight", "lora_E"): torch.ones(4, 1) for k in sd if "lora_A" in k}})(d)),
     CONFIG_FILE, "init_r"),
    ("zero-rank", lambda d: (edit_config(r=0)(d), tensors(lambda sd: {
        k: t[:0] if "lora_A" in k else t[:, :0] for k, t in sd.items()})(d)), CONFIG_FILE, "rank"),
]


@pytest.mark.parametrize("case, mutate, file, reason", HOSTILE, ids=[getattr(c, "values", c)[0] for c in HOSTILE])
def test_hostile_directory_refused(case, mutate, file, reason, lora_dir):
    mutate(lora_dir)
    assert_refused(lambda: load_adapter_dir(lora_dir, case), lora_dir / file, reason)


def test_rank_patterns_that_backtrack_cannot_stall_the_loader(lora_dir, monkeypatch):
    """rank_pattern / alpha_pattern keys are regular expressions from the adapter's config. ``(.+)+!`` takes
    ~2^30 steps on a module name with Python's re (minutes, in the one loader every tenant's loads go through);
    matched with the regex module it fails at once, and whatever still runs past the adapter's time budget is
    refused, naming the field."""
    edit_config(alpha_pattern={"(.+)+!": 2}, rank_pattern={"(\\w|\\w)+!": 2})(lora_dir)
    weights = load_adapter_dir(lora_dir, "patterns")  # no key matches: the config's r and lora_alpha serve
    assert weights.modules
    import regex

    class Slow:
        def match(self, *args, timeout=None):
            assert timeout is not None and timeout <= formats.PATTERN_BUDGET_S
            raise TimeoutError("regex timed out")

    monkeypatch.setattr(regex, "compile", lambda pattern: Slow())
    assert_refused(lambda: load_adapter_dir(lora_dir, "patterns"), lora_dir / CONFIG_FILE,
                   "rank_pattern against the module names took over")


EMBEDDING_LORA = LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])


@pytest.mark.parametrize("config, save_embedding_layers, reason", [
    (EMBEDDING_LORA, False, "lora_embedding_[AB].* embedding LoRA"),
    (EMBEDDING_LORA, "auto", "embed_tokens"),  # PEFT's default also saves the full embed_tokens.base_layer
    (EMBEDDING_LORA, "auto", "embedding LoRA"),
    (LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "auto", "modules_to_save=.*lm_head"),
    (LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "auto", "bias='all'"),
], ids=["embedding-lora", "embedding-lora-with-base", "embedding-lora-reason", "modules-to-save", "bias-all"])
def test_real_peft_unsupported_features_refused(config, save_embedding_layers, reason, make_adapter):
    directory, _ = make_adapter(config, save_embedding_layers)
    assert_refused(lambda: load_adapter_dir(directory, "x"), directory, reason)


class _Payload:
    """Unpickling this creates ``path``: proof of code execution if it ever appears."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("pickle_name", PICKLE_FILES)
def test_pickle_is_never_unpickled(pickle_name, lora_dir, tmp_path):
    control, marker = tmp_path / "control", tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()  # the payload is live, so the absence of the marker below means something
    (lora_dir / pickle_name).write_bytes(pickle.dumps(_Payload(marker)))
    assert load_adapter_dir(lora_dir, "x").rank == 4  # beside safetensors: the pickle is ignored
    (lora_dir / WEIGHTS_FILE).unlink()
    assert_refused(lambda: load_adapter_dir(lora_dir, "x"), lora_dir / WEIGHTS_FILE,
                   f"only pickle weights \\({pickle_name}\\).*never loaded.*safe_serialization=True")
    assert not marker.exists()


def test_size_limit_and_not_a_directory(lora_dir):
    size = (lora_dir / WEIGHTS_FILE).stat().st_size
    assert_refused(lambda: load_adapter_dir(lora_dir, "x", max_bytes=size - 1), lora_dir / WEIGHTS_FILE,
                   f"{size} bytes exceeds the {size - 1}-byte adapter limit")
    assert load_adapter_dir(lora_dir, "x", max_bytes=size).rank == 4
    assert_refused(lambda: load_adapter_dir(lora_dir / CONFIG_FILE, "x"), lora_dir / CONFIG_FILE, "not a directory")
    assert_refused(lambda: load_adapter_dir(lora_dir / "nope", "x"), lora_dir / "nope", "not a directory")


# --- check_against_base ------------------------------------------------------------------------------------

def _without(suffix):
    return lambda targets, w: {m: s for m, s in targets.items() if not m.endswith(suffix)}


def _hand_written(fix):
    return lambda targets, w: {m: fix(*targets[m]) for m in w.modules}


BASE_CASES = {  # id: (peft config, llama overrides, targets(base_targets, weights), max_rank, reason)
    "rank-over-limit": (LoraConfig(r=4, target_modules=["q_proj"]), {}, None, 3,
                        r"q_proj has rank 4 > --max-lora-rank 3"),
    "module-base-lacks": (LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), {}, _without("v_proj"), 8,
                          r"targets 'model\.layers\.\d\.self_attn\.v_proj', which is not a linear layer"),
    "output-head": (LoraConfig(r=4, target_modules=["lm_head"]), {}, None, 8, "'lm_head', which is not a linear"),
    "other-base-model": (LoraConfig(r=4, target_modules=["q_proj"]), {"hidden_size": 48}, None, 8,
                         r"q_proj\.a has shape \(4, 48\), the base model needs \(4, 32\)"),
    "hand-written-out": (LoraConfig(r=4, target_modules=["v_proj"]), {}, _hand_written(lambda i, o: (i, o * 2)), 8,
                         r"v_proj\.b has shape \(16, 4\), the base model needs \(32, 4\)"),
    "dora-magnitude": (LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]), {}, None, 8, None),
    "ia3-input-side": (IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]), {},
                       _hand_written(lambda i, o: (o, i)), 0, r"down_proj\.ia3 has shape \(64,\), .* needs \(32,\)"),
    "ia3-output-side": (IA3Config(target_modules=["k_proj"], feedforward_modules=[]), {},
                        _hand_written(lambda i, o: (o, i)), 0, r"k_proj\.ia3 has shape \(16,\), .* needs \(32,\)"),
}


@pytest.mark.parametrize("case", BASE_CASES, ids=list(BASE_CASES))
def test_check_against_base_refuses(case, make_adapter, base_targets):
    config, overrides, targets_fn, max_rank, reason = BASE_CASES[case]
    directory, _ = make_adapter(config, False, **overrides)  # no full lm_head copy: reach check_against_base
    weights = load_adapter_dir(directory, case)
    if reason is None:  # a magnitude vector of the wrong length, behind otherwise fitting a/b
        module = next(iter(weights.modules))
        weights.modules[module].magnitude = torch.ones(31)
        reason = r"magnitude has shape \(31,\), the base model needs \(32,\)"
    targets = targets_fn(base_targets, weights) if targets_fn else base_targets
    assert_refused(lambda: check_against_base(weights, targets, max_rank), directory / WEIGHTS_FILE, reason)


def test_base_model_name_mismatch_only_warns(lora_dir, base_targets, caplog):
    edit_config(base_model_name_or_path="org/other-model")(lora_dir)
    weights = load_adapter_dir(lora_dir, "mine")
    assert weights.base_model_name_or_path == "org/other-model"
    with caplog.at_level("WARNING", logger="server.adapters.formats"):
        check_against_base(weights, base_targets, max_rank=4, base_model_name="org/tiny-llama")
    assert "org/other-model" in caplog.text and "org/tiny-llama" in caplog.text
