"""Detokenizer: a request's new text each step, never splitting a multi-byte character, with stop checks.

Incremental: each step decodes only a short window of the newest tokens, O(1) per token however long the
output grows (vLLM's scheme). ``req.text`` holds the text of output tokens [0, read_offset); the window starts
at ``prefix_offset``, a few tokens back, so a tokenizer that merges across token boundaries (byte-level BPE
pieces of one character, SentencePiece's leading spaces) decodes the new token in context:

    new text = decode(ids[prefix_offset:]) minus decode(ids[prefix_offset:read_offset])

While the window ends inside a UTF-8 character (decodes to U+FFFD) nothing is taken and the window grows.
Until the first text is taken the window starts with the prompt's last few tokens (vLLM's too): decoded alone, a
SentencePiece first token would lose its leading space ("▁fox" reads "fox" at the start of a text).
"""
from __future__ import annotations

from server.engine.request import Request

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 6  # prompt tokens before the first output token's window


class Detokenizer:
    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids

    def finish_reason(self, req: Request, token: int, max_len: int) -> str | None:
        """Why ``req`` stops after appending ``token`` (stop strings are checked in ``delta``)."""
        p = req.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            req.stop_reason = token
            return "stop"
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= max_len:
            return "length"
        return None

    def delta(self, req: Request) -> str:
        """Update ``req.text`` and return the characters that are now safe to emit.

        Holds back an incomplete UTF-8 sequence and, while running, any tail that could still become a stop
        string. A stop string ends the request (finish_reason "stop") and is not emitted; neither is the EOS or
        stop token that ended it (both are, with vLLM's include_stop_str_in_output).
        """
        ids = req.output_token_ids
        end = len(ids)
        keep_stop = req.params.include_stop_str_in_output
        if req.finish_reason == "stop" and ids and not keep_stop and (ids[-1] in req.params.stop_token_ids
                                                                      or ids[-1] in self.eos_token_ids):
            end -= 1
        self._advance(req, end, flush=req.finish_reason is not None)
        text = req.text
        stops = req.params.stop
        if stops and len(ids) > req.params.min_tokens:
            # a stop string must end in text not searched yet (vLLM: nor in the first min_tokens tokens' text)
            hits = [(i, len(s), s) for i, s in ((text.find(s, max(0, req.stop_checked_len - len(s) + 1)), s)
                                                for s in stops) if i != -1]
            if hits:
                at = min(hits)[0]  # the earliest stop string; kept, the longest of those that start there
                _, n, req.stop_reason = max((h for h in hits if h[0] == at), key=lambda h: h[1])
                req.text = text = text[:at + n if keep_stop else at]
                req.finish_reason = "stop"
        req.stop_checked_len = len(text)
        safe = len(text)
        if req.finish_reason is None and stops:
            safe = min(safe, max(req.sent_text_len, safe - max(len(s) for s in stops) + 1))
        new = text[req.sent_text_len:safe]
        req.sent_text_len = max(req.sent_text_len, safe)
        return new

    def _advance(self, req: Request, end: int, flush: bool) -> None:
        """Take the text of output tokens [read_offset, end) into ``req.text`` (see the module docstring);
        ``flush`` takes it even when it ends inside a character (the request is over)."""
        if end <= req.read_offset:
            return
        ids = req.output_token_ids
        decode, skip = self.tokenizer.decode, req.params.skip_special_tokens
        head = self._prompt_context(req) if req.read_offset == 0 else []
        before = decode(head + ids[req.prefix_offset:req.read_offset], skip_special_tokens=skip)
        after = decode(head + ids[req.prefix_offset:end], skip_special_tokens=skip)
        if len(after) > len(before) and (flush or not after.endswith(REPLACEMENT)):
            req.text += after[len(before):]
            req.prefix_offset, req.read_offset = req.read_offset, end

    def _prompt_context(self, req: Request) -> list[int]:
        """The prompt's last PROMPT_CONTEXT tokens, or none where they end inside a character (the first output
        token would complete it, and the text taken would start with the character's tail)."""
        head = req.prompt_token_ids[-PROMPT_CONTEXT:]
        text = self.tokenizer.decode(head, skip_special_tokens=req.params.skip_special_tokens)
        return [] if text.endswith(REPLACEMENT) else head
