"""Mixed batches through ModelRunner (prefill + greedy decode) against PEFT run per request.

Each row of one batch has its own adapter (every kind in conftest.ADAPTER_KINDS) or none; prompts differ in
length, so right padding is exercised. The oracle for a row is PeftModel.from_pretrained on a fresh base,
fed that row's prompt plus the tokens we generated (a causal model's logits at position p are the
last-position logits of the prefix ending at p): logits must agree and every token we fed must be PEFT's
argmax; in fp32 PEFT's own greedy ``generate`` must also produce our token sequence.
"""
from __future__ import annotations

import pytest
import torch
from support import ADAPTER_KINDS, Rows, peft_model_for

from server.adapters.formats import check_against_base, load_adapter_dir
from server.config import EngineConfig
from server.engine.runner import ModelRunner
from server.layers import kernels

STEPS = 8  # decode steps after the prefill
EOS = 2


def make_prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(6, vocab, (n,), generator=gen).tolist() for n in lengths]


def run_greedy(runner: ModelRunner, prompts, names, weights, steps: int = STEPS):
    """Prefill then ``steps`` greedy decode steps. Returns logits [rows, steps+1, vocab] and tokens [rows][steps+1]."""
    keys = [None if n is None else (n, 0) for n in names]
    rows = Rows(runner)
    logits = [rows.prefill(0, prompts, keys, weights)]
    for step in range(steps):
        fed = logits[-1].argmax(-1).tolist()
        logits.append(rows.decode(fed, weights))
    out = torch.stack(logits, 1)
    return out, out.argmax(-1).tolist()


class Oracles:
    """PEFT models cached per adapter name, and our host AdapterWeights (checked against the runner's base)."""

    def __init__(self, model_dir, adapters, runner: ModelRunner, quantization: str = "none"):
        self.model_dir, self.adapters, self.runner, self.quant = model_dir, adapters, runner, quantization
        # PEFT 0.21 + bitsandbytes 0.50 on CPU: DoRA over int8 breaks the layer's state after one forward
        # (dequantize_module_weight re-wraps weight via Int8Params.to, leaving SCB None), so int8 models are
        # not reused and get exactly one forward each.
        self.reuse = quantization != "int8"
        self.models, self.host = {}, {}

    def peft(self, name):
        if name in self.models:
            return self.models[name]
        path = None if name is None else self.adapters[name]
        model = peft_model_for(self.model_dir, path, quantization=self.quant)
        if self.reuse:
            self.models[name] = model
        return model

    def weights(self, key):
        name = key[0]
        if name not in self.host:
            w = load_adapter_dir(self.adapters[name], name)
            check_against_base(w, self.runner.targets, self.runner.config.max_lora_rank)
            self.host[name] = w
        return self.host[name]

    @torch.no_grad()
    def check_row(self, name, prompt, our_logits, our_tokens, atol):
        """our_logits [steps+1, vocab] for the sequence prompt + our_tokens[:-1]."""
        model = self.peft(name)
        seq = torch.tensor([prompt + our_tokens[:-1]])
        ref = model(input_ids=seq).logits[0, len(prompt) - 1:].float()
        diff = (our_logits - ref).abs().max().item()
        assert diff <= atol, f"{name}: logits differ from PEFT by {diff:.3g} (> {atol})"
        # greedy, step by step: each token we fed is PEFT's argmax for the same prefix
        assert ref.argmax(-1).tolist() == our_tokens, f"{name}: greedy tokens differ from PEFT's argmax"
        if self.quant != "none":  # PEFT's generate on quantized bases adds time, not coverage, beyond the argmax
            return
        prompt_ids = seq[:, :len(prompt)]
        gen = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                             max_new_tokens=len(our_tokens), do_sample=False, pad_token_id=0)
        peft_tokens = gen[0, len(prompt):].tolist()
        ours = our_tokens[:our_tokens.index(EOS) + 1] if EOS in our_tokens else our_tokens
        assert peft_tokens == ours, f"{name}: greedy tokens differ from PEFT's generate"


def check_batch(oracles: Oracles, names, lengths, atol, seed=0, steps=STEPS):
    runner = oracles.runner
    prompts = make_prompts(lengths, runner.vocab_size, seed)
    logits, tokens = run_greedy(runner, prompts, names, oracles.weights, steps)
    for i, name in enumerate(names):
        oracles.check_row(name, prompts[i], logits[i], tokens[i], atol)
    return logits, tokens


# ---------------------------------------------------------------- fp32

@pytest.fixture(scope="module", params=["numba", "reference"])
def runner(request, tiny_model_dir):
    """Both LoRA paths: the compiled CPU kernel (every step here has short runs) and torch's bmm/matmul; the
    decode attention follows (the compiled paged kernel, or the gather + SDPA reference)."""
    if request.param == "numba" and not kernels.available():
        pytest.skip("numba is not installed")
    runner = ModelRunner(EngineConfig(model=str(tiny_model_dir), max_loras=4, max_lora_rank=8, max_num_seqs=8,
                                      max_model_len=128, lora_kernel=request.param,
                                      attention_kernel="numba" if request.param == "numba" else "torch"))
    assert runner.holder.backend.name == request.param and getattr(runner.holder.backend, "max_run", 0) == (
        kernels.max_run(torch.get_num_threads()) if request.param == "numba" else 0)
    return runner


@pytest.fixture(scope="module")
def oracles(tiny_model_dir, adapters, runner):
    return Oracles(tiny_model_dir, adapters, runner)


# at most max_loras=4 distinct adapters per step (the scheduler's promise); every kind appears, base rows too
BATCHES = {
    "lora-dora-ia3-adalora+base": (["lora", None, "dora", "ia3", "adalora", "lora"], [5, 9, 3, 12, 7, 4]),
    "rslora-pattern-ia3-lora2+base": ([None, "rslora", "lora_pattern", "ia3", "lora2", None],
                                      [6, 11, 2, 8, 5, 13]),
    "one-adapter-fast-path": (["dora", "dora", "dora"], [4, 10, 7]),
    "all-base": ([None, None], [3, 9]),
}


def test_every_kind_is_covered():
    covered = {n for names, _ in BATCHES.values() for n in names if n}
    assert set(ADAPTER_KINDS) <= covered


@pytest.mark.parametrize("batch", list(BATCHES), ids=list(BATCHES))
def test_mixed_batch_matches_peft_fp32(oracles, batch):
    names, lengths = BATCHES[batch]
    check_batch(oracles, names, lengths, atol=1e-4)


@pytest.mark.parametrize("base_row", [0, 3])
def test_base_rows_are_bit_exact_with_an_all_base_batch(oracles, base_row):
    """A base row in a mixed batch equals, bit for bit, the same row when no row uses an adapter
    (then every wrapped layer takes the unwrapped path)."""
    names = ["lora", "ia3", "dora", "adalora"]
    names[base_row] = None
    lengths = [6, 3, 9, 5]
    mixed, _ = check_batch(oracles, names, lengths, atol=1e-4, seed=3)
    prompts = make_prompts(lengths, oracles.runner.vocab_size, 3)
    plain, _ = run_greedy(oracles.runner, prompts, [None] * 4, oracles.weights)
    # decode feeds each row's own argmax, so the base row sees the same tokens in both runs
    assert torch.equal(mixed[base_row], plain[base_row])


# ---------------------------------------------------------------- quantized bases

@pytest.fixture(scope="module")
def quantized(tiny_model_dir, adapters):
    """quantization -> Oracles over a runner with that quantized base, built once per module."""
    cache = {}

    def get(quantization: str) -> Oracles:
        if quantization not in cache:
            r = ModelRunner(EngineConfig(model=str(tiny_model_dir), quantization=quantization, max_loras=4,
                                         max_lora_rank=8, max_num_seqs=8, max_model_len=128))
            cache[quantization] = Oracles(tiny_model_dir, adapters, r, quantization)
        return cache[quantization]
    return get


# The IA3 row drives layer 0's down_proj input to ~24: with LLM.int8's default outlier threshold (6.0) that
# column would be computed in fp16 for EVERY row of the batch, making rows depend on their batch-mates
# (~1e-2 from PEFT); the loader's int8 config turns the outlier split off, and this batch guards that.
QUANT_NAMES, QUANT_LENGTHS = ["lora", None, "dora", "ia3", "adalora", "dora"], [5, 9, 3, 12, 7, 4]
QUANT_STEPS = 5  # bitsandbytes on CPU is slow; prefill + 5 greedy steps still cover decode on quantized layers


# bitsandbytes rounds an int8 layer's input to fp16 before quantizing it, so the ~1e-6 by which a cached decode
# step and PEFT's full forward differ in fp32 can flip one fp16 rounding: measured 1.3e-3 at one step of five
# (logits ~2.2, so ~1 fp16 ulp relative), everything else agreeing to 1e-5. Likewise nf4 on CPUs with
# AVX512-BF16, where bitsandbytes repacks 4-bit weights and its kernel rounds each input to bf16 (measured on
# one layer: 1e-6 of input noise changes nothing, a 1.2e-5 difference flips a rounding and moves that layer's
# output 3.9e-3): 1.1e-3 in the logits at one step of five, base rows exact. Greedy tokens must still be equal.
QUANT_ATOL = {"nf4": 2e-3, "int8": 2e-3}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_mixed_batch_matches_peft(quantized, quantization):
    check_batch(quantized(quantization), QUANT_NAMES, QUANT_LENGTHS, atol=QUANT_ATOL[quantization],
                steps=QUANT_STEPS)
