"""Structured outputs in the engine: a request with a grammar gets PEFT's greedy tokens restricted to what the
grammar allows at each step (the oracle walks the same grammar over PEFT's logits), whatever it is batched
with (free requests, other adapters, other grammars), preempted or not, with the mask built on the worker
thread or inline. GrammarCompiler caches and refuses bad specs naming the field."""
from __future__ import annotations

import json
import re

import pytest
import torch

from server.engine.grammar import GrammarCompiler, GrammarSpec
from server.engine.request import SamplingParams
from server.errors import InvalidRequestError
from .helpers import Oracle, drain, submit

DIGITS = GrammarSpec("regex", r"[0-9]{2,6}")
CHOICE = GrammarSpec("choice", json.dumps(["fox", "dog", "capital of France"]))
SCHEMA = GrammarSpec.json_schema({"type": "object", "properties": {"ok": {"type": "boolean"},
                                                                   "n": {"enum": [1, 22, 333]}},
                                  "required": ["ok", "n"], "additionalProperties": False}, "response_format")


def prompt(eng, text: str) -> list[int]:
    return eng.tokenizer.encode(text)


@torch.inference_mode()
def constrained_greedy(oracle: Oracle, compiled, adapter, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """PEFT's logits, every disallowed token at -inf (a fresh matcher walks the grammar), argmax; stops after
    the grammar accepts a stop token."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiled)
    ids, out = list(prompt_ids), []
    model = oracle.model(adapter)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()[None].clone()
        mask = xgrammar.allocate_token_bitmask(1, logits.shape[-1])
        matcher.fill_next_token_bitmask(mask, 0)
        xgrammar.apply_token_bitmask_inplace(logits, mask)
        token = int(logits[0].argmax())
        assert matcher.accept_token(token)
        out.append(token)
        ids.append(token)
        if matcher.is_terminated():
            break
    return out


def constrained(eng, text, spec, adapter=None, max_tokens=64, **kw):
    return submit(eng, prompt(eng, text), adapter, max_tokens=max_tokens, ignore_eos=False,
                  grammar=eng.grammar.compile(spec), **kw)


def output_text(eng, req) -> str:
    return eng.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("overlap", [True, False])
def test_mixed_batch_each_constrained_request_equals_its_oracle(fresh_llm, oracle, overlap):
    """Free and constrained requests, base and adapters, three grammars in one batch: every constrained output
    matches its grammar and equals the oracle (so, also, what it would be alone); the free ones equal PEFT."""
    eng = fresh_llm(overlap_token_masks=overlap, max_num_seqs=6)
    jobs = [("hello world", DIGITS, "lora"), ("The quick brown", CHOICE, None), ("Paris is", SCHEMA, "dora"),
            ("Adapters are", SCHEMA, None)]
    reqs = [constrained(eng, text, spec, adapter) for text, spec, adapter in jobs]
    free = [submit(eng, prompt(eng, "hello world"), a, max_tokens=10) for a in ("lora", "ia3")]
    drain(eng)
    for req, (text, spec, adapter) in zip(reqs, jobs):
        want = constrained_greedy(oracle, eng.grammar.compile(spec), adapter, req.prompt_token_ids, 64)
        assert req.output_token_ids == want, (spec.kind, adapter)
        assert req.finish_reason == "stop", (spec.kind, req.finish_reason, output_text(eng, req))
    assert re.fullmatch(r"[0-9]{2,6}", output_text(eng, reqs[0]))
    assert output_text(eng, reqs[1]) in ("fox", "dog", "capital of France")
    for req in reqs[2:]:
        value = json.loads(output_text(eng, req))
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and value["n"] in (1, 22, 333)
    for req in free:
        assert req.output_token_ids == oracle.greedy(req.adapter, req.prompt_token_ids, 10)[0]


def test_preempted_constrained_request_keeps_its_grammar_state(fresh_llm, oracle):
    """A KV cache too small for all four: the preempted requests are recomputed from their tokens; the grammar
    is not replayed (it would refuse tokens it already accepted) and outputs equal the oracle."""
    eng = fresh_llm(kv_cache_memory="96KiB", max_num_seqs=4, max_model_len=128)
    long_digits = GrammarSpec("regex", r"[a-z0-9 ]{400}")  # longer than 40 tokens can write
    reqs = [submit(eng, list(range(20 + i, 40 + i)), name, max_tokens=40, ignore_eos=False,
                   grammar=eng.grammar.compile(long_digits)) for i, name in enumerate(["lora", None, "dora", "ia3"])]
    drain(eng, max_steps=500)
    assert any(r.num_preemptions for r in reqs), "the cache was meant to run out"
    for req in reqs:
        want = constrained_greedy(oracle, eng.grammar.compile(long_digits), req.adapter, req.prompt_token_ids, 40)
        assert req.output_token_ids == want, (req.adapter, req.num_preemptions)


def test_sampled_constrained_request_stays_in_its_grammar(llm):
    reqs = [constrained(llm, "hello", CHOICE, temperature=1.0, seed=s) for s in range(4)]
    drain(llm)
    assert all(output_text(llm, r) in ("fox", "dog", "capital of France") for r in reqs)


def test_compile_is_cached_and_bad_specs_name_their_field(llm):
    compiler: GrammarCompiler = llm.grammar
    assert compiler.compile(SCHEMA) is compiler.compile(GrammarSpec.json_schema(json.loads(SCHEMA.value),
                                                                                "response_format"))
    for spec in (GrammarSpec("regex", "(unclosed", "structured_outputs.regex"),
                 GrammarSpec("grammar", "root ::= missing_rule", "structured_outputs.grammar"),
                 GrammarSpec("json", '{"type": "no-such-type"}', "response_format.json_schema")):
        with pytest.raises(InvalidRequestError) as err:
            compiler.compile(spec)
        assert err.value.param == spec.field and spec.field in err.value.message


def test_params_share_a_grammar_and_each_request_gets_its_own_matcher(llm):
    params = SamplingParams(max_tokens=8, temperature=0, grammar=llm.grammar.compile(DIGITS))
    a = submit(llm, prompt(llm, "hello"), None, **{k: getattr(params, k) for k in ("max_tokens", "grammar")},
               ignore_eos=False)
    b = submit(llm, prompt(llm, "hello"), None, max_tokens=8, ignore_eos=False, grammar=params.grammar)
    assert a.constraint is not b.constraint
    drain(llm)
    assert a.output_token_ids == b.output_token_ids
