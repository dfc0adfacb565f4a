"""The per-row sampler as it was before sampling moved onto the device (server/engine/sampler.py at 21bcb19),
kept unchanged as the oracle the batched one is compared with (test_sampler_batched.py).

Sampler: next token per row from last-token logits, each row with its own parameters and generator.

A row's result depends only on its own logits, parameters and generator, never on what else is in the
batch: seeded requests are reproducible whatever they are batched with. A request with a grammar has its
row masked first (TokenMask, one op for the batch), so everything after it (argmax, logprobs, penalties,
sampling) sees only the tokens its grammar allows, as in vLLM.
"""
from __future__ import annotations

import torch

from server.engine.request import Request
from server.engine.sampler import Sampler


class RowSampler(Sampler):
    """The old __call__ over the new class's bookkeeping (generators per request, seeded alike; grammar masks)."""

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int | None], list, list]:
        """Sampler.__call__'s contract, one row at a time."""
        if self.mask is not None:
            self.mask.apply(logits, requests)
        plain = [self._plain_greedy(r) for r in requests]
        top, fast = logits.max(-1)  # the plain-greedy tokens and, by NaN/inf propagation, the health check
        finite = torch.isfinite(top).tolist()
        fast = fast.tolist()
        logits = logits.cpu()
        tokens, logprobs, tops = [], [], []
        for i, (row, req) in enumerate(zip(logits, requests)):
            if not finite[i]:
                tokens.append(None)
                logprobs.append(None)
                tops.append(None)
                continue
            if plain[i]:
                token = fast[i]
            elif req.params.greedy:
                token = int(torch.argmax(self._process(row.clone(), req)))
            else:
                probs = self._filter(self._process(row.clone(), req), req)
                token = int(torch.multinomial(probs, 1, generator=self._generator(req, probs.device)))
            tokens.append(token)
            lp, top = None, None
            if req.params.logprobs:
                logp = torch.log_softmax(row, -1)  # [vocab]
                lp = float(logp[token])
                if req.params.top_logprobs:
                    values, ids = torch.topk(logp, req.params.top_logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
            logprobs.append(lp)
            tops.append(top)
        return tokens, logprobs, tops

    def _plain_greedy(self, req: Request) -> bool:
        """Greedy with nothing that edits the logits: the batched argmax is the answer."""
        p = req.params
        return (p.greedy and p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty
                and len(req.output_token_ids) >= p.min_tokens)

    def _process(self, scores: torch.Tensor, req: Request) -> torch.Tensor:
        """Repetition penalty (HF semantics), presence/frequency penalties (OpenAI semantics, over generated
        tokens) and min_tokens (no EOS / stop token before it)."""
        p = req.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(req.all_token_ids)), dtype=torch.long)
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            ids, counts = torch.tensor(req.output_token_ids, dtype=torch.long).unique(return_counts=True)
            scores[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(scores.dtype)
        if len(req.output_token_ids) < p.min_tokens:
            banned = (set() if p.ignore_eos else self.eos_token_ids) | set(p.stop_token_ids)
            if banned:
                scores[torch.tensor(sorted(banned), dtype=torch.long)] = -float("inf")
        return scores

    @staticmethod
    def _filter(scores: torch.Tensor, req: Request) -> torch.Tensor:
        """Temperature, then top-k, then top-p; returns probabilities."""
        p = req.params
        scores = scores / p.temperature
        if p.top_k and p.top_k > 0 and p.top_k < scores.shape[0]:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        probs = torch.softmax(scores, -1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, -1) - sorted_probs < p.top_p  # always keeps the top token
            mask = torch.zeros_like(probs, dtype=torch.bool)
            mask[order[keep]] = True
            probs = torch.where(mask, probs, torch.zeros_like(probs))
        return probs
