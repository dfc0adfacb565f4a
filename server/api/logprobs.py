"""LogprobShapes: the engine's logprobs as the OpenAI and vLLM response shapes.

completion (legacy): {"tokens", "token_logprobs", "text_offset", "top_logprobs": [{text: logprob}]}; with echo
    the prompt's tokens come first, the first with null logprob and null top_logprobs (OpenAI, vLLM).
chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
vllm_prompt (vLLM's prompt_logprobs): [null, {"<token id>": {"logprob", "rank", "decoded_token"}}, ...]

JSON has no -inf: a logprob of a token its grammar forbids is written as -9999.0, as vLLM does.
"""
from __future__ import annotations

import math

from server.api.generation import token_text

FLOOR = -9999.0


def finite(logprob: float | None) -> float | None:
    return None if logprob is None else (logprob if math.isfinite(logprob) else FLOOR)


class LogprobShapes:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return token_text(self.tokenizer, token_id)

    def completion(self, token_ids: list[int], logprobs: list, tops: list | None = None, offset: int = 0) -> dict:
        """top_logprobs[i]: the requested number of most likely tokens' text -> logprob, plus the chosen token
        (so up to logprobs + 1 entries, as vLLM); None where ``logprobs[i]`` is None (a prompt's first token)."""
        tokens = [self.text(t) for t in token_ids]
        offsets, at = [], offset
        for token in tokens:
            offsets.append(at)
            at += len(token)
        tops = tops or [[]] * len(tokens)
        top_dicts = [None if lp is None else {**{self.text(i): finite(v) for i, v in top}, t: finite(lp)}
                     for t, lp, top in zip(tokens, logprobs, tops)]
        return {"tokens": tokens, "token_logprobs": [finite(lp) for lp in logprobs], "text_offset": offsets,
                "top_logprobs": top_dicts}

    def echoed(self, prompt_ids: list[int], prompt_logprobs: list | None, k: int) -> dict:
        """The completion shape of an echoed prompt from the engine's prompt logprobs, ``k`` (the request's
        logprobs) most likely tokens each: the engine computed max(logprobs, prompt_logprobs)."""
        entries = prompt_logprobs or [None] * len(prompt_ids)
        lps = [None if e is None else e[0] for e in entries]
        tops = [[] if e is None else e[1][:k] for e in entries]
        return self.completion(prompt_ids, lps, tops)

    def chat(self, token_ids: list[int], logprobs: list[float], tops: list | None = None) -> dict:
        def entry(token_id: int, lp: float) -> dict:
            token = self.text(token_id)
            return {"token": token, "logprob": finite(lp), "bytes": list(token.encode("utf-8"))}

        tops = tops or [[]] * len(token_ids)
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, lp, top in zip(token_ids, logprobs, tops)]}

    def vllm_prompt(self, prompt_ids: list[int], prompt_logprobs: list | None, k: int) -> list | None:
        """vLLM's prompt_logprobs (``k`` of them): per prompt token, its own and the top-k tokens' {logprob,
        rank, decoded_token} keyed by token id; rank is 1-based in the distribution (the prompt's own token is
        ranked over the whole vocabulary, as vLLM does, inside the top k or not)."""
        if prompt_logprobs is None:
            return None
        out: list = []
        for token, entry in zip(prompt_ids, prompt_logprobs):
            if entry is None:
                out.append(None)
                continue
            lp, top, rank = entry[0], entry[1][:k], entry[2]
            ranked = {i: (v, r) for r, (i, v) in enumerate(top, 1)}
            own = {token: (lp, rank)}
            out.append({str(i): {"logprob": finite(v), "rank": r, "decoded_token": self.text(i)}
                        for i, (v, r) in {**own, **ranked}.items()})
        return out
