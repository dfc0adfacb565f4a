"""Prompt logprobs over HTTP: echo + logprobs (lm-eval's loglikelihood request), max_tokens 0, vLLM's
prompt_logprobs on completions and chat, streamed echo, and batches past the old 8-prompt cap. Every value
is PEFT's log-softmax for that prompt under that adapter."""
from __future__ import annotations

import openai
import pytest
import torch

import support

BASE = "tiny-llama"
LP = 1e-4


@pytest.fixture(scope="module")
def prompt_oracle(tiny_model_dir, adapter_root):
    """(adapter, ids) -> [len(ids), vocab] log-softmax rows: row i predicts token i + 1."""
    models = {None: support.peft_model_for(tiny_model_dir, None),
              "alpha": support.peft_model_for(tiny_model_dir, adapter_root / "alpha")}

    @torch.no_grad()
    def logprobs(adapter, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(models[adapter](torch.tensor([ids])).logits[0].float(), -1)
    return logprobs


def token_logprobs(ref: torch.Tensor, ids: list[int]) -> list[float]:
    return [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]


@pytest.mark.parametrize("model, adapter", [(BASE, None), ("alpha", "alpha")])
def test_echo_with_logprobs_is_lm_evals_loglikelihood_request(server, prompt_oracle, model, adapter):
    """lm-eval's request: token-id prompts (a batch), max_tokens 1, logprobs 1, echo. Prompt entries come first
    (the first null), then the generated token; top_logprobs hold the top token and the chosen one."""
    tok = server.engine.tokenizer
    prompts = [tok.encode("Paris is the capital of France"), tok.encode("the quick brown fox jumps")]
    with server.client() as http:
        r = http.post("/v1/completions", json={"model": model, "prompt": prompts, "max_tokens": 1, "logprobs": 1,
                                               "echo": True, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    for choice, ids in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), prompts):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = prompt_oracle(adapter, ids)
        assert lp["token_logprobs"][1:-1] == pytest.approx(token_logprobs(ref, ids), abs=LP)
        for i, top in enumerate(lp["top_logprobs"][1:-1]):
            assert max(top.values()) == pytest.approx(float(ref[i].max()), abs=LP)
        assert choice["text"].startswith(tok.decode(ids))


def test_max_tokens_zero_with_echo_returns_the_prompt_alone(server, prompt_oracle):
    ids = server.engine.tokenizer.encode("hello world")
    out = server.openai().completions.create(model=BASE, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    choice = out.choices[0]
    assert choice.text == server.engine.tokenizer.decode(ids) and out.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(token_logprobs(prompt_oracle(None, ids), ids), abs=LP)
    assert choice.finish_reason == "length"


def test_max_tokens_zero_without_echo_or_prompt_logprobs_is_400(server):
    """vLLM refuses max_tokens 0 (at least 1) except for the echoed prompt alone: nothing to return otherwise."""
    with server.client() as http:
        r = http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 0})
        chat = http.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                                                       "max_completion_tokens": 0})
        scored = http.post("/v1/completions", json={"model": BASE, "prompt": "hi there", "max_tokens": 0,
                                                    "prompt_logprobs": 0})
    assert r.status_code == 400 and "max_tokens must be at least 1" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "max_tokens"
    assert chat.status_code == 400 and "max_completion_tokens must be at least 1" in chat.text, chat.text
    assert scored.status_code == 200 and scored.json()["usage"]["completion_tokens"] == 0, scored.text


def test_vllm_prompt_logprobs_on_completions_and_chat(server, prompt_oracle):
    """vLLM's shape: per prompt token null (first) or {token_id: {logprob, rank, decoded_token}} holding the
    prompt token and the k most likely."""
    tok = server.engine.tokenizer
    ids = tok.encode("Adapters are small")
    with server.client() as http:
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": ids, "max_tokens": 2,
                                               "prompt_logprobs": 2, "temperature": 0})
        chat = http.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 1, "prompt_logprobs": 0,
                                                       "return_token_ids": True})
    entries = r.json()["choices"][0]["prompt_logprobs"]
    ref = prompt_oracle("alpha", ids)
    assert entries[0] is None and len(entries) == len(ids)
    for i, entry in enumerate(entries[1:]):
        own = entry[str(ids[i + 1])]
        assert own["logprob"] == pytest.approx(float(ref[i, ids[i + 1]]), abs=LP)
        # the prompt token's rank over the whole vocabulary, inside the top 2 or not (vLLM's: never null)
        assert own["rank"] == int((ref[i] >= ref[i, ids[i + 1]]).sum())
        ranked = sorted(entry.values(), key=lambda v: v["rank"])
        assert [v["rank"] for v in ranked][:2] == [1, 2]
        assert ranked[0]["logprob"] == pytest.approx(float(ref[i].max()), abs=LP)
    body = chat.json()
    chat_ids = body["prompt_token_ids"]
    assert len(body["prompt_logprobs"]) == len(chat_ids) and body["prompt_logprobs"][0] is None
    want = token_logprobs(prompt_oracle(None, chat_ids), chat_ids)
    got = [e[str(t)]["logprob"] for e, t in zip(body["prompt_logprobs"][1:], chat_ids[1:])]
    assert got == pytest.approx(want, abs=LP)


def test_streamed_echo_carries_the_prompt_logprobs_in_its_first_chunk(server):
    client = server.openai()
    kwargs = dict(model=BASE, prompt="hello world", max_tokens=3, logprobs=1, echo=True, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    assert [lp for c in chunks for lp in c.logprobs.token_logprobs] == whole.logprobs.token_logprobs


def test_prompt_logprobs_with_stream_is_400(server):
    with pytest.raises(openai.BadRequestError) as err:
        server.openai().completions.create(model=BASE, prompt="hi", max_tokens=1, stream=True,
                                           extra_body={"prompt_logprobs": 1})
    assert err.value.response.json()["error"]["param"] == "prompt_logprobs"


def test_more_than_eight_prompts_in_one_request(server):
    prompts = [[5 + i, 6 + i, 7 + i] for i in range(20)]
    out = server.openai().completions.create(model=BASE, prompt=prompts, max_tokens=1, temperature=0)
    assert sorted(c.index for c in out.choices) == list(range(20))
