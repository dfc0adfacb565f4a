"""--cpu-gemm: the base's float32 CPU linears packed for oneDNN (server/layers/gemm.py) give F.linear's results,
hold one copy of each weight, hand the dense weight back exactly, and the runner serves PEFT's outputs on them."""
from __future__ import annotations

import pytest
import torch
from support import Rows, peft_model_for
from torch import nn

from server.adapters.formats import check_against_base, load_adapter_dir
from server.config import EngineConfig
from server.engine.runner import ModelRunner
from server.layers import gemm
from server.layers.adapter_linear import dense_weight

pytestmark = pytest.mark.skipif(not gemm.available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (2,), (7,), (33,), (3, 5), (0,)])
def test_packed_linear_is_f_linear(bias, lead):
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(160, 96, generator=gen))
        if bias:
            linear.bias.copy_(torch.randn(160, generator=gen))
    original = linear.weight.detach().clone()
    packed = gemm.pack(linear, shared=set())
    assert isinstance(packed, gemm.PackedLinear) and packed.packed
    assert torch.equal(packed.dense(), original) and torch.equal(dense_weight(packed), original)
    x = torch.randn(*lead, 96, generator=gen)
    y = packed(x)
    assert y.shape == (*lead, 160)
    torch.testing.assert_close(y, nn.functional.linear(x, original, linear.bias), rtol=1e-5, atol=1e-4)
    # HF reads a linear's weight for its dtype, device and shape only; those read as the original's
    assert (packed.weight.dtype, packed.weight.device, packed.weight.shape) == (torch.float32, x.device, (160, 96))


def test_non_contiguous_input():
    linear = nn.Linear(32, 48)
    packed = gemm.pack(linear, shared=set())
    x = torch.randn(48, 5).T  # [5, 48] -> take 32 columns: a strided view
    torch.testing.assert_close(packed(x[:, :32]), linear(x[:, :32]), rtol=1e-5, atol=1e-5)


def test_only_plain_float32_cpu_linears_are_packed_and_shared_weights_stay_dense():
    """A head tied to the embedding keeps the one shared parameter (dense, oneDNN reorders it per call);
    other dtypes and non-Linear modules are left as they are."""
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head, "bf16": nn.Linear(16, 16).to(torch.bfloat16),
                           "other": nn.Linear(16, 16)})
    shared = gemm.shared_weights(model)
    assert shared == {id(emb.weight)}
    tied = gemm.pack(head, shared)
    assert isinstance(tied, gemm.PackedLinear) and not tied.packed and tied.weight is emb.weight and tied.copied
    x = torch.randn(4, 16)
    torch.testing.assert_close(tied(x), x @ emb.weight.T, rtol=1e-5, atol=1e-5)
    large = gemm.pack(head, shared, copy_max_bytes=50 * 16 * 4 - 1)  # a copy over the cap: reordered per call
    assert not large.copied and large.weight is emb.weight
    torch.testing.assert_close(large(x), x @ emb.weight.T, rtol=1e-5, atol=1e-5)
    assert gemm.pack(model["bf16"], shared) is model["bf16"]
    assert gemm.pack(emb, shared) is emb
    assert gemm.pack(model["other"], shared, min_elements=16 * 16 + 1) is model["other"]  # too small to pay


def test_pack_linears_frees_each_dense_weight_as_it_goes():
    """Packing a model never holds all dense and all packed weights at once: when a layer is packed, the
    dense weights of the layers packed before it are gone (start-up memory stays near one copy)."""
    import weakref

    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
    for layer in model:  # as a bf16 checkpoint upcast to float32 is: plain tensors, no file mapping
        layer.weight = nn.Parameter(layer.weight.detach().clone())
    refs = [weakref.ref(layer.weight) for layer in model]
    alive_at_pack = []
    inner = gemm.PackedLinear.__init__

    def counting(self, linear, keep_dense=False, packed_copy=False):
        alive_at_pack.append(sum(r() is not None for r in refs))
        inner(self, linear, keep_dense, packed_copy)
    gemm.PackedLinear.__init__ = counting
    try:
        done = gemm.pack_linears(model)
    finally:
        gemm.PackedLinear.__init__ = inner
    assert len(done) == 4 and all(isinstance(m, gemm.PackedLinear) for m in model)
    assert alive_at_pack == [4, 3, 2, 1], alive_at_pack


def test_cpu_gemm_choice():
    """onednn packs every float32 linear, auto those large enough to pay for oneDNN's call (x86 only), torch none."""
    import platform

    cpu = torch.device("cpu")
    assert gemm.plan("torch", cpu, torch.float32) is None
    assert gemm.plan("onednn", cpu, torch.float32) == 0
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert gemm.plan("auto", cpu, torch.float32) == (gemm.MIN_PACK_ELEMENTS if x86 else None)
    assert gemm.plan("auto", cpu, torch.bfloat16) is None  # torch already sends bf16 matmuls to oneDNN
    with pytest.raises(ValueError, match="--cpu-gemm onednn needs a float32 model on CPU"):
        gemm.plan("onednn", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="--cpu-gemm must be one of auto, onednn, torch"):
        EngineConfig(model="x", cpu_gemm="mkl")


@pytest.fixture(scope="module")
def runners(tiny_model_dir):
    def make(choice):
        return ModelRunner(EngineConfig(model=str(tiny_model_dir), max_loras=4, max_lora_rank=8, max_num_seqs=4,
                                        max_model_len=64, cpu_gemm=choice))
    return make("onednn"), make("torch")


def test_runner_packs_every_base_linear_once(runners, tiny_model_dir):
    """--cpu-gemm onednn packs every base linear, its weight bytes still counted; auto leaves a toy model's
    (all below MIN_PACK_ELEMENTS) on F.linear."""
    from server.engine.loader import parameter_bytes

    packed, plain = runners
    assert parameter_bytes(packed.model) == parameter_bytes(plain.model)
    assert all(isinstance(l.base_layer, gemm.PackedLinear) and l.base_layer.packed for l in packed.layers.values())
    assert isinstance(packed.head, gemm.PackedLinear) and packed.model.get_output_embeddings() is packed.head
    # no dense float32 copy is left behind: the only 2-D float parameters are the embedding's
    dense = [n for n, p in packed.model.named_parameters() if p.dim() == 2]
    assert dense == ["model.embed_tokens.weight"], dense
    assert not any(isinstance(l.base_layer, gemm.PackedLinear) for l in plain.layers.values())
    auto = ModelRunner(EngineConfig(model=str(tiny_model_dir), max_loras=1, max_lora_rank=8, max_num_seqs=1,
                                    max_model_len=16))
    assert not any(isinstance(m, gemm.PackedLinear) for m in auto.model.modules())
    for path, layer in packed.layers.items():
        assert torch.equal(dense_weight(layer.base_layer), dense_weight(plain.layers[path].base_layer)), path


def test_mixed_batch_on_packed_linears_matches_peft(runners, tiny_model_dir, adapters):
    """Prefill + greedy decode of a batch mixing every adapter kind and the base, on oneDNN linears: PEFT's
    logits per request (run alone, on torch's F.linear) within 1e-4, and its greedy tokens."""
    runner = runners[0]
    names = ["lora", "dora", None, "ia3"]
    weights = {}

    def host(key):
        if key[0] not in weights:
            w = load_adapter_dir(adapters[key[0]], key[0])
            check_against_base(w, runner.targets, 8)
            runner.prepare_dora(w)
            weights[key[0]] = w
        return weights[key[0]]
    keys = [None if n is None else (n, 0) for n in names]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(6, 300, (n,), generator=gen).tolist() for n in (5, 9, 3, 7)]
    rows = Rows(runner)
    steps = [rows.prefill(0, prompts, keys, host)]
    fed = [[] for _ in prompts]
    for step in range(4):
        tokens = steps[-1].argmax(-1).tolist()
        for row, t in zip(fed, tokens):
            row.append(t)
        steps.append(rows.decode(tokens, host))
    ours = torch.stack(steps, 1)
    for i, name in enumerate(names):
        model = peft_model_for(tiny_model_dir, None if name is None else adapters[name])
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([prompts[i] + fed[i]])).logits[0].float()[len(prompts[i]) - 1:]
        diff = (ours[i] - ref).abs().max().item()
        assert diff <= 1e-4, f"{name}: {diff:.3g} from PEFT on oneDNN linears"
        assert ref.argmax(-1)[:-1].tolist() == fed[i], f"{name}: greedy tokens differ from PEFT"
