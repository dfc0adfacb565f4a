"""server.adapters.finite through the load path (load_worker.prepare, in-process and in the loader process): an
adapter with a NaN or an Inf anywhere it would reach a slot is refused with 400 naming the file and the tensor;
for half-precision serving, one whose values (B with its scaling folded in, DoRA/IA3 vectors) would overflow the
serving dtype is refused naming the tensor and the dtype, while the same adapter serves in float32/bfloat16."""
from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig
from safetensors.torch import load_file, save_file

from server.adapters import load_worker
from server.adapters.finite import check_finite
from server.adapters.formats import WEIGHTS_FILE, AdapterFormatError, load_adapter_dir
from server.adapters.weights import AdapterWeights, ModuleWeights

Q0 = "base_model.model.model.layers.0.self_attn.q_proj."  # lora_dir: r=4, alpha=8 (scaling 2), q_proj + v_proj
FP16_MAX = 65504.0


def set_value(directory, key, value, index=(0, 0)):
    path = directory / WEIGHTS_FILE
    sd = load_file(str(path))
    sd[key][index] = value
    save_file(sd, str(path))


def prepare(directory, base_targets, dtype=torch.float32, worker=None):
    job = dict(directory=str(directory), name="x", max_bytes=1 << 30, targets=base_targets, max_rank=8,
               base_model_name=None, banks=None, dtype=dtype)
    return worker.load(**job) if worker else load_worker.prepare(**job)


@pytest.fixture(scope="module")
def worker():
    w = load_worker.LoadWorker()
    yield w
    w.close()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("part", ["lora_A", "lora_B"])
@pytest.mark.parametrize("where", ["thread", "process"])
def test_non_finite_weights_are_refused(value, part, where, lora_dir, base_targets, worker):
    set_value(lora_dir, Q0 + f"{part}.weight", value)
    with pytest.raises(AdapterFormatError) as info:
        prepare(lora_dir, base_targets, worker=worker if where == "process" else None)
    message = str(info.value)
    assert info.value.status_code == 400 and str(lora_dir / WEIGHTS_FILE) in message
    assert f"{Q0}{part}.weight" in message and "NaN or Inf" in message


def test_finite_adapter_is_unchanged_by_the_check(lora_dir, base_targets):
    assert prepare(lora_dir, base_targets, torch.float16).rank == 4


def test_fp16_overflow_after_scaling_is_refused_only_for_fp16(lora_dir, base_targets, worker):
    """40000 fits float16, but the slot holds it times the scaling 2: 80000, which float16 cannot."""
    set_value(lora_dir, Q0 + "lora_B.weight", 40000.0)
    for w in (None, worker):
        with pytest.raises(AdapterFormatError) as info:
            prepare(lora_dir, base_targets, torch.float16, worker=w)
        message = str(info.value)
        assert f"{Q0}lora_B.weight" in message and "times its scaling 2" in message and "80000" in message
        assert "float16's largest finite value 65504" in message and "--dtype float32" in message
    for dtype in (torch.float32, torch.bfloat16):
        assert prepare(lora_dir, base_targets, dtype).rank == 4  # the same adapter is fine there


def test_fp16_limit_is_the_dtype_maximum(lora_dir, base_targets):
    set_value(lora_dir, Q0 + "lora_B.weight", FP16_MAX / 2)  # times 2: exactly the largest float16
    prepare(lora_dir, base_targets, torch.float16)
    set_value(lora_dir, Q0 + "lora_A.weight", 70000.0)  # A is not scaled: over on its own
    with pytest.raises(AdapterFormatError, match=r"lora_A\.weight' reaches 70000, beyond float16"):
        prepare(lora_dir, base_targets, torch.float16)


def test_float32_overflow_of_the_scaled_b_is_refused(lora_dir, base_targets):
    set_value(lora_dir, Q0 + "lora_B.weight", 3e38)  # finite in the file, Inf once scaled by 2 in float32
    with pytest.raises(AdapterFormatError, match=r"times its scaling 2 reaches 6e\+38, beyond float32"):
        prepare(lora_dir, base_targets)


def test_ia3_and_dora_vectors_are_checked_for_fp16(make_adapter, base_targets):
    ia3_dir, _ = make_adapter(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    key = next(k for k in load_file(str(ia3_dir / WEIGHTS_FILE)) if "k_proj" in k)
    set_value(ia3_dir, key, 1e5)
    with pytest.raises(AdapterFormatError, match=r"ia3_l\.weight' reaches 1e\+05, beyond float16"):
        prepare(ia3_dir, base_targets, torch.float16)
    dora_dir, _ = make_adapter(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]))
    set_value(dora_dir, Q0 + "lora_magnitude_vector", 1e5, index=(0,))
    with pytest.raises(AdapterFormatError, match=r"lora_magnitude_vector' reaches 1e\+05, beyond float16"):
        prepare(dora_dir, base_targets, torch.float16)
    assert prepare(dora_dir, base_targets, torch.float32).kind == "dora"


def test_dora_factors_computed_after_the_read_are_checked(lora_dir):
    """DoRA's d = m / ||W + sBA|| is computed in the server after the read (ModelRunner.prepare_dora); a row of
    zero norm makes it Inf, and the store checks the finished factors with the same function."""
    weights = load_adapter_dir(lora_dir, "x")
    module = next(iter(weights.modules))
    mw = weights.modules[module]
    weights.modules[module] = ModuleWeights(a=mw.a, slot_b=mw.b.T.float() * 2, magnitude=torch.ones(mw.b.shape[0]),
                                            dora_scale=torch.full((mw.b.shape[0],), float("inf")))
    with pytest.raises(AdapterFormatError, match=r"DoRA scale m / \|\|W \+ s\*B@A\|\|' holds NaN or Inf"):
        check_finite(weights)


def test_non_finite_scaling_is_refused():
    weights = AdapterWeights("x", "LORA", False, {"m": ModuleWeights(a=torch.ones(1, 2), b=torch.ones(2, 1),
                                                                     scaling=float("nan"))}, "/adapters/x")
    with pytest.raises(AdapterFormatError, match=r"non-finite scaling \(nan\): check lora_alpha and r"):
        check_finite(weights)


def test_adalora_names_both_factors_of_its_a(make_adapter, base_targets):
    from peft import AdaLoraConfig

    directory, _ = make_adapter(AdaLoraConfig(init_r=4, target_r=2, total_step=10, lora_alpha=8,
                                              target_modules=["q_proj"]))
    set_value(directory, Q0 + "lora_E", float("nan"))
    with pytest.raises(AdapterFormatError, match=r"lora_A\.weight x [\w.]+q_proj\.lora_E' holds NaN or Inf"):
        prepare(directory, base_targets)
