"""Detokenizer: streamed text never splits a UTF-8 character, stop strings are held back until they can no
longer match, and min_tokens defers them."""
from __future__ import annotations

import pytest

from server.engine.detokenizer import Detokenizer
from server.engine.request import Request, SamplingParams
from .helpers import FFFD


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


@pytest.mark.parametrize("min_tokens, text, tokens", [(0, "a", 3), (2, "a", 3), (3, "abcde", 7), (4, "abcde", 7),
                                                      (6, "abcde", 7), (7, "abcdebcx", 10)])
def test_a_stop_string_must_end_after_the_first_min_tokens_tokens(llm, min_tokens, text, tokens):
    """vLLM's rule: text of the first min_tokens tokens is never where a stop string ends (it may start there);
    one ending inside it is not matched later either, and nothing sent is ever taken back."""
    tok = llm.tokenizer
    req, deltas = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, "abcdebcxbcz"), stop=["bc"], min_tokens=min_tokens)
    assert (req.text, len(req.output_token_ids), req.stop_reason) == (text, tokens, "bc")
    assert "".join(deltas) == text


def test_detokenizer_work_per_token_does_not_grow_with_the_output(llm):
    """Incremental: each step decodes a window of a few tokens, not the whole output (O(1) per token), and
    the streamed text is still exactly the whole output decoded at once."""
    tok = llm.tokenizer
    decoded_lengths = []

    class Counting:
        def decode(self, ids, **kw):
            decoded_lengths.append(len(ids))
            return tok.decode(ids, **kw)

    tokens = tok.encode("The quick brown fox jumps over the lazy dog. héllo 你好 🙂 " * 20, add_special_tokens=False)
    req, deltas = _feed(Detokenizer(Counting(), {2}), tokens)
    assert "".join(deltas) == tok.decode(tokens, skip_special_tokens=True)
    assert len(tokens) > 300 and max(decoded_lengths) <= 8


def test_include_stop_str_in_output_keeps_the_stop_string_and_the_stop_token(llm):
    """vLLM's include_stop_str_in_output: the stop string stays in the text (the longest of those that match at
    the earliest place), and so does the text of the stop token that ended the request."""
    tok = llm.tokenizer
    req, deltas = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, "ab你好cd!"), stop=["好c", "你好"],
                        include_stop_str_in_output=True)  # 你好 completes first
    assert req.finish_reason == "stop" and req.text == "ab你好" == "".join(deltas)
    assert not any(FFFD in d for d in deltas)
    x = _byte_tokens(tok, "x")[0]
    kept, _ = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, "abxyz"), stop_token_ids=[x],
                    include_stop_str_in_output=True)
    dropped, _ = _feed(Detokenizer(tok, {2}), _byte_tokens(tok, "abxyz"), stop_token_ids=[x])
    assert (kept.finish_reason, kept.text, dropped.text) == ("stop", "abx", "ab")


def test_skip_special_tokens_false_keeps_their_text(llm):
    tok = llm.tokenizer
    tokens = _byte_tokens(tok, "ab") + [tok.bos_token_id] + _byte_tokens(tok, "cd")
    plain, _ = _feed(Detokenizer(tok, {2}), tokens)
    raw, deltas = _feed(Detokenizer(tok, {2}), tokens, skip_special_tokens=False)
    assert plain.text == "abcd" and raw.text == "ab<s>cd" == "".join(deltas)


def test_a_sentencepiece_first_token_keeps_its_leading_space():
    """Metaspace (Llama-2, Mistral): "▁fox" decodes to "fox" at the start of a text, " fox" after other words.
    The first output token is decoded after the prompt's last tokens, so the continuation keeps its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import support

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    tk.train_from_iterator(support.CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    full = tok.encode("The quick brown fox jumps", add_special_tokens=False)
    prompt, out = full[:3], full[3:]
    req = Request("d", prompt, SamplingParams(max_tokens=len(out)))
    detok, deltas = Detokenizer(tok, {2}), []
    for t in out:
        req.output_token_ids.append(t)
        req.finish_reason = req.finish_reason or detok.finish_reason(req, t, 1000)
        deltas.append(detok.delta(req))
    want = tok.decode(full)[len(tok.decode(prompt)):]
    assert want.startswith(" ") and "".join(deltas) == req.text == want
