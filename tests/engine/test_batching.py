"""LLMEngine.step() driven directly: continuous batching with requests joining and leaving, seeds, stops,
EOS and min_tokens. The oracle is PEFT on the same tiny random Llama: greedy tokens and log-probabilities of
each request equal PEFT's for that request's adapter, whatever else shares the batch."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.request import Request, RequestOutput
from .helpers import config, decode, drain, encode, run_alone, step, streamed, submit


# (arrival step, adapter, prompt text, max_tokens, logprobs)
SCHEDULE = [
    (0, "lora", "The quick brown", 6, True),
    (0, None, "Paris is", 9, False),
    (0, "dora", "héllo 你好 🙂", 4, False),
    (1, "ia3", "hello world", 7, True),
    (2, "lora", "Berlin", 3, False),
    (3, "adalora", "emoji 🙂 and", 5, True),
    (4, None, "0123", 2, True),
    (5, "rslora", "Adapters are small", 6, False),
    (6, "lora_pattern", "The capital", 5, False),
    (8, "lora2", "quick fox", 4, True),
    (9, None, "wörld", 3, False),
]


def test_continuous_batching_with_joins_and_leaves_matches_peft(llm, oracle):
    outputs: dict[str, list[RequestOutput]] = {}
    reqs: list[tuple[Request, str | None, int, bool]] = []
    first_token_step, finish_step, busy_rows = {}, {}, []
    for n in range(200):
        for arrival, adapter, text, max_tokens, lp in SCHEDULE:
            if arrival == n:
                reqs.append((submit(llm, encode(llm, text), adapter, max_tokens=max_tokens, logprobs=lp),
                             adapter, max_tokens, lp))
        for req, out in step(llm, outputs):
            first_token_step.setdefault(req.request_id, n)
            if out.finished:
                finish_step[req.request_id] = n
        busy_rows.append(len(llm.scheduler.running))
        if n > SCHEDULE[-1][0] and not llm.scheduler.has_work:
            break
    assert not llm.scheduler.has_work and len(reqs) == len(SCHEDULE)

    for req, adapter, max_tokens, lp in reqs:
        want, want_lp = oracle.greedy(adapter, req.prompt_token_ids, max_tokens)
        tokens, text = streamed(outputs[req.request_id])
        assert tokens == req.output_token_ids == want, (adapter, req.prompt_token_ids)
        assert outputs[req.request_id][-1].finish_reason == "length"
        assert [o.finished for o in outputs[req.request_id]] == [False] * (max_tokens - 1) + [True]
        assert text == decode(llm, want)
        if lp:
            got = [x for o in outputs[req.request_id] for x in o.logprobs]
            assert got == pytest.approx(want_lp, abs=1e-4)
        else:
            assert all(o.logprobs is None for o in outputs[req.request_id])
    # the schedule really exercised joins and leaves: a request joined while others were mid-generation, and
    # one left while others went on
    ids = [r.request_id for r, *_ in reqs]
    assert any(first_token_step[a] > first_token_step[b] and first_token_step[a] < finish_step[b]
               for a in ids for b in ids)
    assert any(finish_step[a] < finish_step[b] and first_token_step[b] <= finish_step[a] for a in ids for b in ids)
    assert max(busy_rows) == llm.config.max_num_seqs


def test_new_request_prefills_next_step_while_others_decode(llm, oracle):
    outputs: dict = {}
    long = submit(llm, encode(llm, "The quick brown"), "lora", max_tokens=10)
    for _ in range(3):
        step(llm, outputs)
    late = submit(llm, encode(llm, "Paris"), None, max_tokens=4)
    step(llm, outputs)
    assert len(late.output_token_ids) == 1  # joined at once
    assert len(long.output_token_ids) == 4  # the running stream advanced in the same step: no stall
    drain(llm, outputs)
    assert long.output_token_ids == oracle.greedy("lora", long.prompt_token_ids, 10)[0]
    assert late.output_token_ids == oracle.greedy(None, late.prompt_token_ids, 4)[0]


def test_top_k_one_equals_greedy(llm, oracle):
    prompts = [encode(llm, t) for t in ("The quick", "héllo", "Paris is the")]
    reqs = [submit(llm, p, a, temperature=t, top_k=1, max_tokens=8)
            for p, a, t in zip(prompts, ("dora", None, "ia3"), (0.7, 1.0, 2.5))]
    noise = submit(llm, prompts[0], "dora", temperature=1.0, seed=3, max_tokens=8)  # sampled neighbour
    drain(llm)
    for r in reqs:
        assert r.output_token_ids == oracle.greedy(r.adapter, r.prompt_token_ids, 8)[0]
    assert noise.output_token_ids != reqs[0].output_token_ids  # the neighbour really sampled


def test_same_seed_same_tokens_alone_or_batched(llm):
    prompt = encode(llm, "Adapters are")
    sampled = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    alone = run_alone(llm, prompt, "lora", **sampled).output_token_ids

    others = [submit(llm, encode(llm, "The quick"), None, temperature=1.2, seed=5, max_tokens=12),
              submit(llm, encode(llm, "héllo"), "dora", temperature=1.0, max_tokens=6)]  # unseeded
    step(llm)
    target = submit(llm, prompt, "lora", **sampled)  # joins a running batch, different row
    step(llm)
    others.append(submit(llm, encode(llm, "0123"), "lora", temperature=0.0, max_tokens=4))
    drain(llm)
    assert target.output_token_ids == alone

    other_seed = run_alone(llm, prompt, "lora", **{**sampled, "seed": 4321}).output_token_ids
    assert other_seed != alone
    greedy = run_alone(llm, prompt, "lora", max_tokens=10).output_token_ids
    assert alone != greedy  # the seeded run really sampled


def _printable(s: str) -> bool:
    return all(c.isascii() and c.isprintable() for c in s)


def test_stop_strings_end_the_request_and_are_not_emitted(llm):
    prompt = encode(llm, "Paris is the capital of")
    full = run_alone(llm, prompt, None, max_tokens=16)
    text = full.text
    assert full.finish_reason == "length" and text == decode(llm, full.output_token_ids)
    # prefer a two-character stop that spans a token boundary (the hold-back path)
    bounds = {len(decode(llm, full.output_token_ids[:i])) for i in range(1, 16)}
    cands = [(p, text[p:p + 2]) for p in range(1, len(text) - 1)
             if _printable(text[p:p + 2]) and text.find(text[p:p + 2]) == p]
    p, stop = next(((p, s) for p, s in cands if p + 1 in bounds), cands[0])

    outs: dict = {}
    req = submit(llm, prompt, None, max_tokens=16, stop=["never-there", stop])
    drain(llm, outs)
    tokens, streamed_text = streamed(outs[req.request_id])
    assert outs[req.request_id][-1].finish_reason == "stop"
    assert streamed_text == req.text == text[:p]
    assert stop not in streamed_text
    assert tokens == full.output_token_ids[:len(tokens)] and len(tokens) < 16
    assert stop in decode(llm, tokens) and stop not in decode(llm, tokens[:-1])  # stopped on the token completing it


def test_stop_token_ids_and_min_tokens_match_peft(llm, oracle):
    prompt = encode(llm, "The quick brown")
    full, _ = oracle.greedy(None, prompt, 16)
    i = next(i for i in range(2, 12) if full[i] not in full[:i])
    stop_id = full[i]

    outs: dict = {}
    req = submit(llm, prompt, None, max_tokens=16, stop_token_ids=[stop_id])
    drain(llm, outs)
    assert req.output_token_ids == full[:i + 1] and req.finish_reason == "stop"
    assert streamed(outs[req.request_id])[1] == decode(llm, full[:i])  # the stop token's text is not emitted

    # min_tokens bans the stop token until reached: the same as transformers' min_new_tokens with it as EOS
    req = submit(llm, prompt, None, max_tokens=16, stop_token_ids=[stop_id], min_tokens=i + 2)
    drain(llm)
    with torch.inference_mode():
        ref = oracle.model(None).generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=i + 2,
                                          do_sample=False, eos_token_id=[stop_id], pad_token_id=0)
    assert req.output_token_ids == ref[0, len(prompt):].tolist()
    assert len(req.output_token_ids) >= i + 2 and req.output_token_ids[i] != stop_id


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, oracle, tmp_path_factory):
    """The tiny model with its EOS moved to a token its greedy continuation emits, so EOS handling is testable.
    Returns (model dir, prompt, full greedy continuation, index of the EOS in it)."""
    out = tmp_path_factory.mktemp("eos-model")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    prompt = [392, 275, 268]
    full, _ = oracle.greedy(None, prompt, 16)
    i = next(i for i in range(2, 12) if full[i] not in full[:i] and 2 not in full[:i + 1])
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / name).read_text())
        cfg["eos_token_id"] = full[i]
        (out / name).write_text(json.dumps(cfg))
    return out, prompt, full, i


def test_eos_ignore_eos_and_min_tokens(eos_model, root):
    model_dir, prompt, full, i = eos_model
    eng = LLMEngine(config(model_dir, root))
    try:
        eos = full[i]
        assert eos in eng.eos_token_ids
        outs: dict = {}
        stops = submit(eng, prompt, max_tokens=16, ignore_eos=False)
        ignores = submit(eng, prompt, max_tokens=16, ignore_eos=True)
        both = submit(eng, prompt, max_tokens=16, ignore_eos=True, min_tokens=i + 3)
        delayed = submit(eng, prompt, max_tokens=16, ignore_eos=False, min_tokens=i + 2)
        drain(eng, outs)
        assert stops.output_token_ids == full[:i + 1] and stops.finish_reason == "stop"
        assert streamed(outs[stops.request_id])[1] == decode(eng, full[:i])  # EOS is not in the text
        assert ignores.output_token_ids == full and ignores.finish_reason == "length"
        assert both.output_token_ids == full  # ignore_eos: min_tokens does not ban EOS, EOS does not stop
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.inference_mode():
            ref = base.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=i + 2, do_sample=False,
                                eos_token_id=sorted(eng.eos_token_ids), pad_token_id=0)[0, len(prompt):].tolist()
        assert delayed.output_token_ids == ref and delayed.output_token_ids[i] != eos
        assert len(delayed.output_token_ids) >= i + 2
        assert delayed.finish_reason == ("stop" if ref[-1] in eng.eos_token_ids else "length")
    finally:
        eng.store.close()


def test_max_model_len_ends_with_length(fresh_llm):
    eng = fresh_llm(max_model_len=12)
    req = run_alone(eng, [5, 6, 7, 8], None, max_tokens=8)
    assert len(req.output_token_ids) == 8 and req.num_tokens == 12 and req.finish_reason == "length"
