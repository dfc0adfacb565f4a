"""Engine v2 against the PEFT oracle: prompts served from cached prefix blocks, prompts longer than the step's
token budget (chunked prefill), requests preempted for KV blocks and recomputed, the prefix cache's isolation
rules (base vs adapter, a name reloaded with other weights), and a non-finite adapter slot that must not reach
any other row. Every request's greedy tokens and log-probabilities equal PEFT's for its own adapter."""
from __future__ import annotations

import shutil

import pytest
import torch

from server.engine.engine import LLMEngine
from server.layers.mapping import SlotGroups
from .helpers import Oracle, config, drain, step, submit

LP = 1e-4  # log-probability tolerance (fp32)


def tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(6, 300, (n,), generator=gen).tolist()


def check(req, oracle: Oracle, max_tokens: int) -> None:
    want, want_lp = oracle.greedy(req.adapter, req.prompt_token_ids, max_tokens)
    assert req.finish_reason == "length", (req.request_id, req.finish_reason)
    assert req.output_token_ids == want, f"{req.request_id} ({req.adapter}): greedy tokens differ from PEFT"
    assert req.output_logprobs == pytest.approx(want_lp, abs=LP), req.request_id


def run(eng: LLMEngine, reqs) -> None:
    drain(eng, max_steps=500)
    assert all(r.finish_reason is not None for r in reqs)


# ---------------------------------------------------------------- prefix caching

def test_prompt_served_from_cached_prefix_blocks_equals_a_cold_run(fresh_llm, oracle):
    """Three requests share a 40-token system prefix (2 full blocks); the later ones start after it and still
    equal PEFT (which sees the whole prompt) and a cold engine's run of the same prompt."""
    eng = fresh_llm()
    system = tokens(40, seed=1)
    first = submit(eng, system + tokens(5, 2), "lora", max_tokens=6, logprobs=True)
    run(eng, [first])
    later = [submit(eng, system + tokens(n, 3 + n), adapter, max_tokens=6, logprobs=True)
             for n, adapter in ((3, "lora"), (9, "lora"))]
    run(eng, later)
    for req in [first] + later:
        check(req, oracle, 6)
    assert first.num_cached_tokens == 0 and [r.num_cached_tokens for r in later] == [32, 32]
    cold = fresh_llm(enable_prefix_caching=False)
    again = submit(cold, later[1].prompt_token_ids, "lora", max_tokens=6, logprobs=True)
    run(cold, [again])
    assert again.num_cached_tokens == 0 and again.output_token_ids == later[1].output_token_ids


def test_a_whole_cached_prompt_recomputes_only_its_last_block(fresh_llm, oracle):
    eng = fresh_llm()
    prompt = tokens(48, seed=4)  # exactly three blocks
    reqs = []
    for _ in range(2):
        reqs.append(submit(eng, prompt, None, max_tokens=4, logprobs=True))
        run(eng, reqs[-1:])
    assert reqs[1].num_cached_tokens == 32
    for req in reqs:
        check(req, oracle, 4)


def test_base_and_adapter_never_share_a_prefix(fresh_llm, oracle):
    eng = fresh_llm()
    prompt = tokens(37, seed=5)
    order = [None, "lora", "ia3", "lora", None]
    reqs = []
    for adapter in order:  # one at a time: each finds what the earlier ones left in the cache
        reqs.append(submit(eng, prompt, adapter, max_tokens=5, logprobs=True))
        run(eng, reqs[-1:])
    assert [r.num_cached_tokens for r in reqs] == [0, 0, 0, 32, 32]
    for req in reqs:
        check(req, oracle, 5)


def test_cache_salt_shares_blocks_only_within_one_salt(fresh_llm, oracle):
    """vLLM's cache_salt: requests share prefix blocks only with the same salt (and adapter content); an unsalted
    request never meets a salted one's blocks. Every output still equals PEFT."""
    eng = fresh_llm()
    prompt = tokens(37, seed=6)
    order = [("lora", "a"), ("lora", "b"), ("lora", None), ("lora", "a"), (None, "a"), ("lora", None), ("lora", "b")]
    reqs = []
    for adapter, salt in order:  # one at a time: each finds what the earlier ones left in the cache
        reqs.append(submit(eng, prompt, adapter, max_tokens=5, logprobs=True, cache_salt=salt))
        run(eng, reqs[-1:])
    assert [r.num_cached_tokens for r in reqs] == [0, 0, 0, 32, 0, 32, 32]
    for req in reqs:
        check(req, oracle, 5)


def test_a_name_reloaded_with_other_weights_never_reuses_the_old_kv(fresh_llm, oracle, root, tmp_path):
    """vLLM #42125: the cache is keyed by the adapter's content, so reloading a name with new weights starts
    cold, and the old weights' blocks serve neither it nor anyone else."""
    swap = tmp_path / "swap"
    shutil.copytree(root / "lora", swap)
    eng = fresh_llm(adapter_roots=[str(tmp_path)])
    prompt = tokens(35, seed=6)
    v1 = submit(eng, prompt, "swap", max_tokens=5, logprobs=True)
    run(eng, [v1])
    old = eng.store.entries["swap"]
    shutil.rmtree(swap)
    shutil.copytree(root / "lora2", swap)
    new = eng.store.register("swap", str(swap), replace=True)  # what load_inplace / replace does: the name moves
    eng.store.ensure_host(new).result(timeout=60)  # once the new version has loaded
    eng.drop_device(old.key)
    v2 = []
    for _ in range(2):
        v2.append(submit(eng, prompt, "swap", max_tokens=5, logprobs=True))
        run(eng, v2[-1:])
    assert v1.num_cached_tokens == 0 and v2[0].num_cached_tokens == 0 and v2[1].num_cached_tokens == 32
    assert eng.store.entries["swap"].content_hash != old.content_hash
    for req, weights in ((v1, "lora"), (v2[0], "lora2"), (v2[1], "lora2")):
        want, want_lp = oracle.greedy(weights, prompt, 5)
        assert req.output_token_ids == want and req.output_logprobs == pytest.approx(want_lp, abs=LP)


# ---------------------------------------------------------------- chunked prefill and preemption

@pytest.mark.parametrize("attention", ["numba", "torch"])
def test_prompt_longer_than_the_token_budget_is_prefilled_in_chunks(fresh_llm, oracle, attention):
    """Budget 8 tokens a step: a 45-token prompt takes several steps beside two running streams, which get
    their token every step, and every request still equals PEFT (on both decode attention paths)."""
    eng = fresh_llm(max_num_batched_tokens=8, max_num_seqs=4, attention_kernel=attention)
    streams = [submit(eng, tokens(3, 7 + i), adapter, max_tokens=20, logprobs=True)
               for i, adapter in enumerate(("dora", None))]
    step(eng)
    long = submit(eng, tokens(45, 9), "adalora", max_tokens=4, logprobs=True)
    chunk_steps = 0
    while not long.output_token_ids:
        before = [len(s.output_token_ids) for s in streams]
        step(eng)
        assert [len(s.output_token_ids) for s in streams] == [b + 1 for b in before], "a stream was stalled"
        chunk_steps += 1
    assert chunk_steps == 8  # 45 tokens, 6 a step beside the two decodes
    run(eng, streams + [long])
    for req in streams + [long]:
        check(req, oracle, req.params.max_tokens)


def test_long_prefill_threshold_starts_later_prompts_beside_a_long_one(fresh_llm, oracle):
    """--long-prefill-token-threshold 5 under a 16-token budget: a 45-token prompt computes 5 tokens a step and a
    short prompt sent after it starts in its first step; every request still equals PEFT."""
    eng = fresh_llm(max_num_batched_tokens=16, max_num_seqs=4, long_prefill_token_threshold=5)
    long = submit(eng, tokens(45, 9), "adalora", max_tokens=4, logprobs=True)
    short = submit(eng, tokens(4, 3), "dora", max_tokens=6, logprobs=True)
    step(eng)
    assert long.num_computed_tokens == 5 and short.num_computed_tokens == 4 and len(short.output_token_ids) == 1
    run(eng, [long, short])
    for req in (long, short):
        check(req, oracle, req.params.max_tokens)


@pytest.mark.parametrize("attention", ["numba", "torch"])
def test_preempted_requests_are_recomputed_with_unchanged_output(fresh_llm, oracle, attention):
    """A KV cache of 11 usable blocks for four requests that need 4 each: the newest are preempted, recomputed
    from their tokens (prompt and output so far) and finish with exactly PEFT's output."""
    eng = fresh_llm(kv_cache_memory="96KiB", max_num_seqs=4, max_model_len=128, attention_kernel=attention)
    assert eng.blocks.pool.num_blocks == 12
    names = ["lora", None, "dora", "ia3"]
    queries = []

    class Counter:
        def on_prefix_cache(self, asked: int, hits: int) -> None:
            queries.append((asked, hits))

    eng.observers.append(Counter())
    reqs = [submit(eng, tokens(20, 20 + i), name, max_tokens=40, logprobs=True) for i, name in enumerate(names)]
    run(eng, reqs)
    assert any(r.num_preemptions for r in reqs), "the cache was meant to run out"
    assert reqs[0].num_preemptions == 0  # the oldest is never the victim
    for req in reqs:
        check(req, oracle, 40)
    assert eng.blocks.pool.num_free == 11
    # a resumed request's recompute (its own output's blocks come back from the cache) is neither the prompt's
    # cached tokens reported in usage nor a prefix-cache query: vLLM counts first admissions only
    assert [r.num_cached_tokens for r in reqs] == [0, 0, 0, 0]
    assert sum(asked for asked, _ in queries) == 4 * 20 and sum(hits for _, hits in queries) == 0


def test_a_request_larger_than_the_whole_cache_is_refused_at_start(tiny_model_dir, root):
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        LLMEngine(config(tiny_model_dir, root, kv_cache_memory="96KiB", max_model_len=256))


# ---------------------------------------------------------------- tenant isolation

@pytest.fixture(params=["numba", "grouped", "segments"])
def lora_path(request, monkeypatch):
    """The engine's LoRA path: the compiled CPU kernel, the grouped bmm op, or the per-slot loop."""
    from server.layers import kernels

    if request.param == "numba" and not kernels.available():
        pytest.skip("numba is not installed")
    if request.param == "segments":
        monkeypatch.setattr(SlotGroups, "MAX_PADDING", -1e9)  # padding always "too costly": the loop
    return request.param


def test_a_non_finite_slot_never_reaches_another_row(fresh_llm, oracle, root, tmp_path, lora_path):
    """Test-only: NaN and Inf written into a resident adapter's slot mid-generation. Its own request fails
    alone (non-finite logits); every other row of the batch, base rows included, still equals PEFT."""
    shutil.copytree(root / "lora2", tmp_path / "poisoned")
    for kind in ("lora", "rslora", "ia3", "dora"):
        shutil.copytree(root / kind, tmp_path / kind)
    eng = fresh_llm(adapter_roots=[str(tmp_path)], max_loras=4, max_num_seqs=6,
                    lora_kernel="numba" if lora_path == "numba" else "reference")
    names = ["lora", None, "poisoned", "rslora", "ia3", "poisoned"]
    reqs = [submit(eng, tokens(4 + 2 * i, 40 + i), name, max_tokens=8, logprobs=True)
            for i, name in enumerate(names)]
    step(eng)
    slot = eng.runner.manager.slot_of[reqs[2].adapter_keys[0]]
    with torch.no_grad():
        for layer in eng.runner.layers.values():
            layer.lora_a[slot, 0, 0] = float("nan")
            layer.lora_b[slot, 1, 0] = float("inf")
    outputs: dict = {}
    drain(eng, outputs)
    for req, name in zip(reqs, names):
        if name == "poisoned":
            assert req.finish_reason == "abort" and "non-finite" in outputs[req.request_id][-1].error
        else:
            check(req, oracle, 8)


# ---------------------------------------------------------------- prompt logprobs

@pytest.mark.parametrize("budget", [256, 8], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_equal_peft_in_a_mixed_batch(fresh_llm, oracle, budget):
    """vLLM's prompt_logprobs: each prompt token's logprob given its prefix and the k most likely tokens, from
    the same batched forward as the prefill (across chunks when the prompt is longer than the budget), exact
    against PEFT's logits for that prompt; never read from the prefix cache, which holds no logits."""
    eng = fresh_llm(max_num_batched_tokens=budget, max_num_seqs=4)
    prompt = tokens(37, seed=50)
    warm = submit(eng, prompt, "dora", max_tokens=1)
    run(eng, [warm])
    reqs = [submit(eng, prompt, name, max_tokens=m, prompt_logprobs=2, logprobs=True)
            for name, m in (("dora", 3), (None, 0), ("ia3", 1))]
    others = [submit(eng, tokens(5, 51), "lora", max_tokens=4, logprobs=True)]
    outputs: dict = {}
    drain(eng, outputs)
    for req in reqs:
        assert req.num_cached_tokens == 0
        first = outputs[req.request_id][0].prompt_logprobs
        assert all(o.prompt_logprobs is None for o in outputs[req.request_id][1:])
        assert len(first) == len(prompt) and first[0] is None
        with torch.no_grad():
            logp = torch.log_softmax(oracle.model(req.adapter)(torch.tensor([prompt])).logits[0, :-1].float(), -1)
        want = logp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
        got = torch.tensor([lp for lp, *_ in first[1:]])
        assert (got - want).abs().max().item() <= LP
        top_ids = [[i for i, _ in top] for _, top, _ in first[1:]]
        assert top_ids == logp.topk(2).indices.tolist()
    assert reqs[1].output_token_ids == [] and reqs[1].finish_reason == "length"
    assert outputs[reqs[1].request_id][-1].finished
    check(reqs[0], oracle, 3)
    check(others[0], oracle, 4)


def test_lora_overlap_on_a_spare_core_matches_peft(fresh_llm, oracle):
    """--lora-overlap on: every step with an adapter is overlapped, a mixed continuous batch and a batch all on one
    adapter (whose run goes to the worker too) equal PEFT."""
    eng = fresh_llm(lora_overlap="on", max_loras=4, max_num_seqs=6)
    names = ["lora", None, "dora", "ia3", "adalora", "lora"]
    reqs = [submit(eng, tokens(3 + 4 * i, 60 + i), name, max_tokens=6, logprobs=True) for i, name in enumerate(names)]
    run(eng, reqs)
    alone = [submit(eng, tokens(5 + 3 * i, 80 + i), "dora", max_tokens=6, logprobs=True) for i in range(4)]
    run(eng, alone)
    for req in reqs + alone:
        check(req, oracle, 6)
