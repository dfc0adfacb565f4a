"""Constraint (one request's grammar state) and TokenMask (the step's token bitmask, applied in one op).

A request whose SamplingParams carry a compiled grammar gets a Constraint when it is created. Each step the
engine asks TokenMask to build the bitmask rows of the constrained requests that will sample (on a worker
thread while the forward runs, when ``overlap``), the sampler applies them to the logits in one op before
anything else looks at the logits, and the engine advances each Constraint with the token it accepted.

Overlap, measured on this project's 2-core CPU with SmolLM2 (bench/structured.py): building and applying the
masks of 32 constrained rows takes 0.54 ms a step, against a ~210 ms step for 32 x 16 adapters, so the worker
thread hides nothing measurable here (all 32 rows constrained: cost -0.5% / +0.1% with it, -1.0% / -0.1%
without, run-to-run noise); it stays on by default for GPUs, where a step is ~100x shorter and the masks are not.

Preemption: a preempted request is recomputed from its tokens, and its output so far is kept; the tokens it
already accepted are never sampled again, so its Constraint is neither reset nor replayed.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from server.layers.transfer import to_device


class Constraint:
    """The grammar matcher of one request: which tokens may come next, advanced by each accepted token."""

    def __init__(self, compiled):
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit = allowed)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False when the grammar does not allow it (state unchanged)."""
        return self._matcher.accept_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing may follow."""
        return self._matcher.is_terminated()


class TokenMask:
    """A preallocated bitmask of ``rows`` x ceil(vocab / 32) int32 words for the constrained rows of a step.

    prepare(requests) starts filling the constrained requests' rows (in that order) and returns at once when
    ``overlap`` (a worker thread does it while the forward runs); apply(logits, requests) waits for it and masks
    the rows of ``logits`` (one per request, in the runner's order) in one op: disallowed tokens get -inf.
    """

    def __init__(self, rows: int, vocab_size: int, overlap: bool):
        import xgrammar

        self._xgrammar = xgrammar
        self.vocab_size = vocab_size
        self.filled = xgrammar.allocate_token_bitmask(rows, vocab_size)  # [rows, words] int32, prepare's order
        self.ordered = torch.empty_like(self.filled)  # [rows, words]: the same rows in the logits' order
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="token-mask") if overlap else None
        self._rows: dict[int, int] = {}  # id(request) -> its row of ``filled``
        self._pending: Future | None = None

    def prepare(self, requests: list) -> None:
        constrained = [r for r in requests if r.constraint is not None and not r.constraint.done]
        self._rows = {id(r): i for i, r in enumerate(constrained)}
        if not constrained:
            return
        if self._worker is None:
            self._fill(constrained)
        else:
            self._pending = self._worker.submit(self._fill, constrained)

    def _fill(self, constrained: list) -> None:
        for i, req in enumerate(constrained):
            req.constraint.fill(self.filled, i)

    def apply(self, logits: torch.Tensor, requests: list) -> None:
        """logits: [len(requests), vocab] float32, masked in place."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        targets = [(j, self._rows[id(r)]) for j, r in enumerate(requests) if id(r) in self._rows]
        if not targets:
            return
        rows = [j for j, _ in targets]
        self.ordered[rows] = self.filled[[i for _, i in targets]]
        bitmask = self.ordered[:len(requests)]  # on the host, where xgrammar's matchers write it
        if bitmask.device != logits.device:  # xgrammar's GPU kernel reads the mask from the logits' device
            bitmask = to_device(bitmask, logits.device)
        self._xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
