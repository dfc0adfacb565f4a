"""Sampler: next token per row from last-token logits, each row with its own parameters and generator, batched
on the logits' device: one host copy per step (the tokens, and the logprobs asked for).

A row's result depends only on its own logits, parameters and generator, never on what else is in the
batch: seeded requests are reproducible whatever they are batched with. A request with a grammar has its
row masked first (TokenMask, one op for the batch), so everything after it (argmax, logprobs, penalties,
sampling) sees only the tokens its grammar allows, as in vLLM.

Per row, in order (each step a batched op over the rows that need it; the others pass through untouched):
    allowed     vLLM's allowed_token_ids: every other token -> -inf
    logit_bias  OpenAI's: the request's bias added to its tokens (vLLM's order: before the penalties)
    penalties   repetition (HF: seen positive logits / p, negative * p, over prompt and output), presence and
                frequency (OpenAI: minus presence + frequency * count, over generated tokens), min_tokens (EOS
                and stop ids at -inf until reached)
    greedy      argmax of the penalised logits
    sampled     / temperature, min_p (vLLM's: below min_p x the top probability -> -inf), top-k (below the
                k-th value -> -inf), softmax, top-p (the smallest prefix of the
                sorted probabilities whose mass before each token is < top_p; the rest -> 0), then the draw
                torch.multinomial makes for one sample, argmax(p / q), q ~ Exp(1) from the row's own generator
    logprobs    log_softmax of the raw (masked) logits at the token, and the top n
Each op is the one the per-row sampler ran on a [vocab] row, run on [rows, vocab]: the tokens are the same
(tests/engine/test_sampler_batched.py compares the two on random parameters).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from server.engine.constraint import TokenMask
from server.engine.request import Request
from server.layers.transfer import to_device

NEG_INF = -float("inf")
CPU_CHUNK_BYTES = 1 << 20  # rows of logits processed together on a CPU (5 of SmolLM2's 49k vocabulary)


class Sampler:
    def __init__(self, eos_token_ids: set[int], seed: int = 0, mask: TokenMask | None = None):
        self.eos_token_ids = eos_token_ids
        self.mask = mask
        self._seeder = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request, device: torch.device) -> torch.Generator:
        gen = self._generators.get(req.request_id)
        if gen is None:
            seed = req.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeder))
            gen = self._generators[req.request_id] = torch.Generator(device).manual_seed(seed)
        return gen

    def prepare(self, requests: list[Request]) -> None:
        """The requests that may sample this step, before its forward: their grammars' masks start building."""
        if self.mask is not None:
            self.mask.prepare(requests)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int | None], list, list]:
        """logits: [rows, vocab] float32 (one row per request). Returns per row: the token, its logprob (or
        None) and the top_logprobs [(token_id, logprob)] (or None) of the raw model distribution (after its
        grammar's mask, if any). A row whose logits are not all finite gets token None (the engine fails that
        request alone)."""
        if self.mask is not None:
            self.mask.apply(logits, requests)
        n = len(requests)
        if not n:
            return [], [], []
        # one pass gives the common case's answer (greedy: the argmax) and the health check: the max propagates NaN
        # and is inf when any logit is +inf (10x faster than isfinite(logits).all())
        top, tokens = row_max(logits)  # [n], [n]
        finite = torch.isfinite(top)
        edited = [i for i, r in enumerate(requests) if not self._plain_greedy(r)]
        if edited:
            tokens = tokens.clone()
        for chunk in _chunks(edited, logits):
            rows = _indices(chunk, logits.device)
            # a copy (the penalties edit it); a non-finite row goes through too (its token is dropped): nothing
            # below validates its input, unlike torch.multinomial, which raises (a device assert on a GPU)
            scores = self._process(logits.index_select(0, rows), [requests[i] for i in chunk])
            finite[rows] &= scores.max(-1).values > float("-inf")  # its masks left it no token (dropped, as above)
            tokens[rows] = self._choose(scores, [requests[i] for i in chunk])
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs]
        k = max((requests[i].params.top_logprobs for i in wanted), default=0)
        chosen, ids, values = [], [], []
        for chunk in _chunks(wanted, logits):
            rows = _indices(chunk, logits.device)
            logp = torch.log_softmax(logits.index_select(0, rows), -1)  # [c, vocab]
            chosen.append(logp.gather(1, tokens.index_select(0, rows)[:, None])[:, 0])
            if k:
                top_values, top_ids = torch.topk(logp, k)  # [c, k]
                ids.append(top_ids.view(-1))
                values.append(top_values.view(-1))
        packed = [tokens.double(), finite.double()] + [t.double() for t in chosen + ids + values]
        host = torch.cat(packed).tolist()  # the step's one copy to the host
        return self._unpack(host, requests, wanted, k)

    @staticmethod
    def _unpack(host: list[float], requests: list[Request], wanted: list[int], k: int):
        n, w = len(requests), len(wanted)
        finite = host[n:2 * n]
        tokens = [int(t) if ok else None for t, ok in zip(host[:n], finite)]
        logprobs, tops = [None] * n, [None] * n
        ids, values = host[2 * n + w:2 * n + w + w * k], host[2 * n + w + w * k:]
        for j, i in enumerate(wanted):
            if tokens[i] is None:
                continue
            logprobs[i] = host[2 * n + j]
            want = requests[i].params.top_logprobs
            if want:
                tops[i] = [(int(t), v) for t, v in zip(ids[j * k:j * k + want], values[j * k:j * k + want])]
        return tokens, logprobs, tops

    def _plain_greedy(self, req: Request) -> bool:
        """Greedy with nothing that edits the logits: the batched argmax is the answer."""
        p = req.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and not p.logit_bias and not p.allowed_token_ids and len(req.output_token_ids) >= p.min_tokens)

    def _choose(self, scores: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """scores: [m, vocab] penalised -> [m] tokens: argmax for greedy rows, a draw for the others. (max's
        indices are argmax's, the first maximum, at a third of the cost on a CPU.)"""
        sampled = [j for j, r in enumerate(requests) if not r.params.greedy]
        if len(sampled) < len(requests):
            tokens = scores.max(-1).indices
        else:
            tokens = torch.zeros(len(requests), dtype=torch.long, device=scores.device)
        if not sampled:
            return tokens
        rows = _indices(sampled, scores.device)
        reqs = [requests[j] for j in sampled]
        probs = self._filter(scores if len(sampled) == len(requests) else scores.index_select(0, rows), reqs)
        # torch.multinomial(probs[j], 1, generator=g_j), row by row, is argmax(probs[j] / q) with q ~ Exp(1) drawn
        # from g_j (its one-sample path); written out so the rows share one divide and one argmax, and so nothing
        # waits on the device (multinomial checks its input with two host syncs a call)
        q = torch.empty_like(probs)
        for j, r in enumerate(reqs):
            q[j].exponential_(1, generator=self._generator(r, scores.device))
        tokens[rows] = (probs / q).max(-1).indices
        return tokens

    def _process(self, scores: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """allowed_token_ids, logit_bias, then repetition penalty (HF semantics), presence/frequency penalties (OpenAI semantics, over generated
        tokens) and min_tokens (no EOS / stop token before it), in place on ``scores`` [m, vocab]. Each touches
        only its (row, token) pairs, gathered from the host in one copy each: dense [m, vocab] masks cost
        10 ms a step on a CPU for a few hundred entries."""
        device = scores.device
        allowed = [(j, r.params.allowed_token_ids) for j, r in enumerate(requests) if r.params.allowed_token_ids]
        if allowed:  # keep the allowed (row, token) scores, set the rest of those rows to -inf
            rows, cols, _ = _pairs([(j, ids, [0.0] * len(ids)) for j, ids in allowed], device)
            kept = scores[rows, cols]
            scores.index_fill_(0, _indices([j for j, _ in allowed], device), NEG_INF)
            scores[rows, cols] = kept
        bias = [(j, list(r.params.logit_bias), list(r.params.logit_bias.values())) for j, r in enumerate(requests)
                if r.params.logit_bias]
        if bias:
            rows, cols, value = _pairs(bias, device)
            scores[rows, cols] += value
        rep = [(j, sorted(set(r.all_token_ids)), r.params.repetition_penalty) for j, r in enumerate(requests)
               if r.params.repetition_penalty != 1.0]
        if rep:
            rows, cols, penalty = _pairs([(j, ids, [p] * len(ids)) for j, ids, p in rep], device)
            picked = scores[rows, cols]
            scores[rows, cols] = torch.where(picked > 0, picked / penalty, picked * penalty)
        pf = [(j, r) for j, r in enumerate(requests)
              if (r.params.presence_penalty or r.params.frequency_penalty) and r.output_token_ids]
        if pf:
            counted = [(j, *zip(*sorted(Counter(r.output_token_ids).items())), r.params) for j, r in pf]
            rows, cols, counts = _pairs([(j, ids, n) for j, ids, n, _ in counted], device)
            _, _, presence = _pairs([(j, ids, [p.presence_penalty] * len(ids)) for j, ids, _, p in counted], device)
            _, _, frequency = _pairs([(j, ids, [p.frequency_penalty] * len(ids)) for j, ids, _, p in counted],
                                     device)
            scores[rows, cols] -= presence + frequency * counts
        self._ban_before_min_tokens(scores, requests)
        return scores

    def _ban_before_min_tokens(self, scores: torch.Tensor, requests: list[Request]) -> None:
        """EOS and stop tokens to -inf in the rows short of min_tokens. A grammar or allowed_token_ids that
        leaves only those tokens (a complete JSON value can only end) wins over min_tokens: such a row keeps
        them and the request ends short of min_tokens with an output its grammar accepts, where a row of -inf
        would draw a token outside it."""
        banned = [(j, sorted(self._banned(r))) for j, r in enumerate(requests)
                  if len(r.output_token_ids) < r.params.min_tokens]
        banned = [(j, ids, [NEG_INF] * len(ids)) for j, ids in banned if ids]
        if not banned:
            return
        device = scores.device
        rows, cols, value = _pairs(banned, device)
        restricted = [j for j, _, _ in banned
                      if requests[j].constraint is not None or requests[j].params.allowed_token_ids]
        kept = scores[rows, cols] if restricted else None
        scores[rows, cols] = value
        if restricted:
            empty = scores.index_select(0, _indices(restricted, device)).max(-1).values == NEG_INF
            dead = {restricted[i] for i in empty.nonzero()[:, 0].tolist()}
            undo = [k for k, row in enumerate(rows.tolist()) if row in dead]
            if undo:
                at = _indices(undo, device)
                scores[rows[at], cols[at]] = kept[at]

    def _banned(self, req: Request) -> set[int]:
        p = req.params
        return (set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids)

    @staticmethod
    def _filter(scores: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, then min_p, then top-k, then top-p (vLLM's order); returns probabilities (not
        renormalised: multinomial is not affected)."""
        device, vocab = scores.device, scores.shape[1]
        temperatures = [r.params.temperature for r in requests]
        if len(set(temperatures)) == 1:
            scores = scores / temperatures[0]
        else:  # a contiguous divisor: a broadcast [m, 1] one runs at a quarter of the speed on a CPU
            scores = scores / _column(temperatures, device).expand_as(scores).contiguous()
        mins = [r.params.min_p for r in requests]
        if any(mins):  # rows at min_p 0 keep everything (no probability is below 0)
            probs = torch.softmax(scores, -1)
            floor = probs.max(-1, keepdim=True).values * _column(mins, device)
            scores = scores.masked_fill(probs < floor, NEG_INF)
        ks = [r.params.top_k if r.params.top_k and 0 < r.params.top_k < vocab else 0 for r in requests]
        if any(ks):
            values = torch.topk(scores, max(ks)).values  # [m, max k], descending
            kth = values.gather(1, _indices([max(k, 1) - 1 for k in ks], device)[:, None])
            kth = torch.where(_indices(ks, device)[:, None] > 0, kth, NEG_INF)
            scores = scores.masked_fill(scores < kth, NEG_INF)
        probs = torch.softmax(scores, -1)
        nucleus = [j for j, r in enumerate(requests) if r.params.top_p < 1.0]
        if nucleus:
            rows = _indices(nucleus, device)
            part = probs.index_select(0, rows)
            sorted_probs, order = torch.sort(part, descending=True)
            top_p = _column([requests[j].params.top_p for j in nucleus], device)
            keep = torch.cumsum(sorted_probs, -1) - sorted_probs < top_p  # always keeps the top token
            # back to vocabulary order, the dropped ones 0 (x 1.0 is exact; a bool mask + where costs 3x more)
            kept = torch.zeros_like(part).scatter_(1, order, sorted_probs * keep)
            probs = kept if len(nucleus) == len(requests) else probs.index_copy(0, rows, kept)
        return probs


def _chunks(rows: list[int], logits: torch.Tensor) -> list[list[int]]:
    """``rows`` in the groups the per-row ops run in: all at once on a GPU; on a CPU as many rows as fit
    CPU_CHUNK_BYTES, so the half-dozen passes over each row (penalties, temperature, top-k, softmax, top-p,
    the draw) run in cache rather than streaming [rows, vocab] through memory each time: all 32 x 49k rows at
    once sampled 1.2-1.5x slower than the per-row sampler it replaced (bench/sampler_step.py, 2 shared cores)."""
    if not rows:
        return []
    if logits.device.type != "cpu":
        return [rows]
    size = max(1, CPU_CHUNK_BYTES // (logits.shape[1] * logits.element_size()))
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _indices(values: list[int], device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.long), device)


def _column(values: list[float], device) -> torch.Tensor:
    """[m, 1] float32 of one parameter per row."""
    return to_device(torch.tensor(values, dtype=torch.float32), device)[:, None]


def _pairs(rows: list[tuple[int, list[int], list[float]]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row index [P], token index [P], value [P] float32) of every (row j, token t, value v) given as
    (j, tokens, values): one host -> device copy for the indices, one for the values."""
    index = to_device(torch.tensor([(j, t) for j, ids, _ in rows for t in ids], dtype=torch.long), device)
    values = to_device(torch.tensor([v for _, _, vs in rows for v in vs], dtype=torch.float32), device)
    return index[:, 0], index[:, 1], values


def row_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and the index of its first occurrence, as ``logits.max(-1)`` gives them (NaN counts as the
    max, so a row with one has a NaN max). On a CPU numpy's vectorized argmax does it: 0.2 ms for 32 rows of a
    49k vocabulary where torch's max(-1) took 1.8 ms and argmax 4 (one thread), 1% of a 32-row decode step."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32:
        return logits.max(-1)
    rows = logits.numpy()
    index = rows.argmax(1)  # [n] int64, the first max; the first NaN where there is one
    return torch.from_numpy(np.take_along_axis(rows, index[:, None], 1)[:, 0]), torch.from_numpy(index)
