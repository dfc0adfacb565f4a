"""Adapter mixtures and scales in the batched step, against PEFT's add_weighted_adapter(..., "cat"): one batch
holds base rows, a plain adapter, an adapter at 0.5, a 2-way and a 3-way mixture with negative scales and an
adapter at scale 0 (which must equal the base model), over adapters of different ranks and target modules.

PEFT's quirk: add_weighted_adapter copies ``use_rslora`` from the first adapter it is given into the mixture's
config, so when that one is rsLoRA the mixture is scaled by sqrt(total rank) instead of 1. The sum is the same
in any order, so the oracle (support.peft_mixture_for) lists a plain LoRA first; our semantics is the stated
one, y = W x + sum s_i dW_i x.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from support import greedy_tokens as greedy, peft_mixture_for, peft_model_for, randomize_adapter
from .helpers import config, drain, submit

MIX = {  # name -> PEFT config arguments: different ranks, target modules, rsLoRA and a rank pattern
    "m1": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]),
    "m2": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "m3": dict(r=4, lora_alpha=4, target_modules=["k_proj", "up_proj", "o_proj"], rank_pattern={"up_proj": 2}),
}
ROWS = [  # (mixture, prompt length): [] = the base model
    ([], 5),
    ([("m1", 1.0)], 7),
    ([("m1", 0.5)], 4),
    ([("m1", 0.7), ("m2", -0.4)], 9),
    ([("m3", 1.2), ("m1", 0.3), ("m2", -0.8)], 6),
    ([("m2", 0.0)], 8),
]
STEPS = 6
NEEDS_TRITON = pytest.mark.skipif(not importlib.util.find_spec("triton"), reason="triton is not installed")


@pytest.fixture(scope="module")
def mix_root(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("mix")
    for i, (name, kwargs) in enumerate(MIX.items()):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(**kwargs))
        randomize_adapter(model, seed=300 + i, scale=0.3)
        model.save_pretrained(root / name)
    return root


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(6, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def oracle_model(model_dir, root, mix, quantization="none"):
    """PEFT's own mixture (support.peft_mixture_for: add_weighted_adapter(cat), plain LoRAs first)."""
    return peft_mixture_for(model_dir, [(root / n, s) for n, s in mix], quantization)


@pytest.mark.parametrize("quantization, tol, kernel", [("none", 1e-4, "auto"), ("none", 1e-4, "reference"),
                                                       pytest.param("none", 1e-4, "triton", marks=NEEDS_TRITON),
                                                       ("nf4", 2e-3, "auto")])
def test_mixtures_scales_and_plain_rows_share_a_batch_and_equal_peft(tiny_model_dir, mix_root, quantization,
                                                                       tol, kernel):
    from server.engine.engine import LLMEngine

    eng = LLMEngine(config(tiny_model_dir, mix_root, max_loras=4, max_num_seqs=6, quantization=quantization,
                           lora_kernel=kernel))
    assert kernel == "auto" or eng.runner.holder.backend.name == kernel
    try:
        reqs = [submit(eng, prompt_of(n, 70 + i), mix, max_tokens=STEPS, logprobs=True)
                for i, (mix, n) in enumerate(ROWS)]
        drain(eng)
    finally:
        eng.store.close()
    for req, (mix, _) in zip(reqs, ROWS):
        want, want_lp = greedy(oracle_model(tiny_model_dir, mix_root, mix, quantization), req.prompt_token_ids,
                               STEPS)
        assert req.output_token_ids == want, f"{mix}: greedy tokens differ from PEFT's add_weighted_adapter"
        assert req.output_logprobs == pytest.approx(want_lp, abs=tol), mix
        if any(s for _, s in mix):  # the check proves something only if the mixture changes the output
            plain = greedy(peft_model_for(tiny_model_dir, None, quantization), req.prompt_token_ids, STEPS)[1]
            assert max(abs(a - b) for a, b in zip(plain, want_lp)) > 10 * tol, f"{mix} does not change the output"


def test_a_scale_zero_adapter_is_the_base_model_bit_for_bit(tiny_model_dir, mix_root):
    """An adapter at scale 0 contributes nothing: its request's logits are the base model's exactly (the
    component is held and loaded, but takes no slot and no route)."""
    from server.engine.engine import LLMEngine

    eng = LLMEngine(config(tiny_model_dir, mix_root, max_loras=4, max_num_seqs=4))
    try:
        prompt = prompt_of(9, 90)
        zero, base = (submit(eng, prompt, mix, max_tokens=5, logprobs=True) for mix in ([("m1", 0.0)], None))
        drain(eng)
        assert zero.output_token_ids == base.output_token_ids and zero.output_logprobs == base.output_logprobs
        assert zero.prefix_identity == b"" and not eng.runner.manager.resident(zero.uses[0].key)
    finally:
        eng.store.close()


@pytest.mark.parametrize("kernel, n", [("auto", 100), ("reference", 12)])  # numba: runs past its max run
def test_a_mixture_naming_one_content_twice_reads_it_once_and_leaves_other_rows_alone(tiny_model_dir, mix_root,
                                                                                       tmp_path, kernel, n):
    """Two names of the same files (one content, one slot) at 0.5 + 0.5 is that adapter at 1.0. Batched beside a
    base request of as many tokens, its two entries per token once made the step look like "every token on one
    adapter": the adapter went onto the base request's rows (another tenant's) and the mixture got half of it."""
    import shutil

    from server.engine.engine import LLMEngine

    for name in ("m1", "twin"):
        shutil.copytree(mix_root / "m1", tmp_path / name)
    eng = LLMEngine(config(tiny_model_dir, tmp_path, max_loras=4, max_num_seqs=4, lora_kernel=kernel,
                           enable_prefix_caching=False))  # the batched run computes both prompts whole
    try:
        base_prompt, mix_prompt = prompt_of(n, 91), prompt_of(n, 92)
        alone = [submit(eng, p, mix, max_tokens=5, logprobs=True)
                 for p, mix in ((base_prompt, None), (mix_prompt, [("m1", 1.0)]))]
        drain(eng)
        base, twice = (submit(eng, p, mix, max_tokens=5, logprobs=True)
                       for p, mix in ((base_prompt, None), (mix_prompt, [("m1", 0.5), ("twin", 0.5)])))
        drain(eng)
        assert eng.store.resolve("m1").key == eng.store.resolve("twin").key  # one content: one slot
        assert base.output_token_ids == alone[0].output_token_ids
        torch.testing.assert_close(base.output_logprobs, alone[0].output_logprobs, rtol=0, atol=1e-5)
        assert twice.output_token_ids == alone[1].output_token_ids
        torch.testing.assert_close(twice.output_logprobs, alone[1].output_logprobs, rtol=0, atol=1e-5)
    finally:
        eng.store.close()
