"""Detokenizer: a request's new text each step, never splitting a multi-byte character, with stop checks."""
from __future__ import annotations

from server.engine.request import Request


class Detokenizer:
    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def finish_reason(self, req: Request, token: int, max_len: int) -> str | None:
        """Why ``req`` stops after appending ``token`` (stop strings are checked in ``delta``)."""
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_len:
            return "length"
        return None

    def delta(self, req: Request) -> str:
        """Update ``req.text`` and return the characters that are now safe to emit.

        Holds back an incomplete UTF-8 sequence (decoded as U+FFFD) and, while running, any tail that could
        still become a stop string. A stop string ends the request (finish_reason "stop") and is not emitted.
        """
        ids = req.output_token_ids
        if req.finish_reason == "stop" and ids and ids[-1] in (set(req.params.stop_token_ids) | self.eos_token_ids):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        req.text = text
        stops = req.params.stop
        if stops and len(req.output_token_ids) > req.params.min_tokens:  # vLLM: min_tokens defers stop strings
            start = max(0, req.sent_text_len - max(len(s) for s in stops))
            hits = [(text.find(s, start), s) for s in stops if text.find(s, start) != -1]
            if hits:
                req.text = text = text[:min(i for i, _ in hits)]
                req.finish_reason = "stop"
        end = len(text)
        if req.finish_reason is None:
            while end > req.sent_text_len and text[end - 1] == "\ufffd":
                end -= 1
            if stops:
                end = min(end, max(req.sent_text_len, end - max(len(s) for s in stops) + 1))
        new = text[req.sent_text_len:end]
        req.sent_text_len = max(req.sent_text_len, end)
        return new
