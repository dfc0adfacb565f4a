"""The batched sampler (server/engine/sampler.py) against the per-row sampler it replaced (sampler_oracle.py):
the same tokens, logprobs and top logprobs, step after step, over many random parameter combinations (greedy,
temperature, top-k, top-p, repetition / presence / frequency penalties, min_tokens with EOS and stop ids,
seeded and engine-seeded rows), batched together, with non-finite rows among them (which leave the batch, as
their requests fail in the engine)."""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from server.engine.request import Request, SamplingParams
from server.engine import sampler
from server.engine.sampler import Sampler
from .sampler_oracle import RowSampler

VOCAB = 300
EOS = 2
_ids = itertools.count()


def random_params(rng: random.Random) -> dict:
    pick = rng.choice
    params = dict(temperature=pick([0.0, 0.3, 0.7, 1.0, 1.5]), top_k=pick([-1, 0, 1, 5, 40, VOCAB, VOCAB + 5]),
                  top_p=pick([1.0, 1.0, 0.9, 0.5, 0.05]), repetition_penalty=pick([1.0, 1.0, 1.3, 0.8]),
                  presence_penalty=pick([0.0, 0.0, 0.5, -0.5]), frequency_penalty=pick([0.0, 0.0, 0.3]),
                  min_tokens=pick([0, 0, 3]), ignore_eos=pick([False, True]),
                  stop_token_ids=pick([[], [7, 11]]), seed=pick([None, rng.randrange(1000)]),
                  logprobs=pick([False, True]))
    if params["logprobs"]:
        params["top_logprobs"] = pick([0, 1, 5])
    return params


def requests(rng: random.Random, n: int) -> list[Request]:
    out = []
    for _ in range(n):
        r = Request(f"b{next(_ids)}", [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))],
                    SamplingParams(**random_params(rng)))
        r.output_token_ids = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 4))]
        out.append(r)
    return out


@pytest.mark.parametrize("rows_per_chunk", [None, 1, 3])
@pytest.mark.parametrize("seed", range(20))
def test_batched_sampler_gives_the_per_row_samplers_tokens(seed, rows_per_chunk, monkeypatch):
    """rows_per_chunk: how many rows the CPU runs together (None: the default, every row here)."""
    if rows_per_chunk:
        monkeypatch.setattr(sampler, "CPU_CHUNK_BYTES", rows_per_chunk * VOCAB * 4)
    rng = random.Random(seed)
    reqs = requests(rng, rng.randrange(1, 24))
    old, new = RowSampler({EOS}, seed=seed), Sampler({EOS}, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for step in range(6):
        logits = torch.randn(len(reqs), VOCAB, generator=gen) * 4
        if step == 2:  # a row gone non-finite: None for it, the others unchanged
            logits[0, 3] = float("nan")
            logits[-1, 5] = float("inf")
        want = old(logits.clone(), reqs)
        got = new(logits.clone(), reqs)
        assert got[0] == want[0], f"step {step}: tokens differ"
        assert got[1] == pytest.approx(want[1], abs=1e-6)
        for g, w in zip(got[2], want[2]):
            assert (g is None) == (w is None)
            if g is not None:
                assert [t for t, _ in g] == [t for t, _ in w]
                assert [v for _, v in g] == pytest.approx([v for _, v in w], abs=1e-6)
        for r, token in zip(reqs, got[0]):
            if token is not None:
                r.output_token_ids.append(token)
        # a row with no token fails its request in the engine (the batched sampler still drew from its
        # generator, which nothing reads again), so it leaves the batch
        reqs = [r for r, token in zip(reqs, got[0]) if token is not None]
        if not reqs:
            break
    assert any(not r.params.greedy for r in reqs) or len(reqs) < 3


def test_an_all_greedy_batch_is_the_argmax_with_one_copy():
    x = torch.randn(7, VOCAB, generator=torch.Generator().manual_seed(1))
    reqs = [Request(f"g{i}", [1], SamplingParams(temperature=0.0)) for i in range(7)]
    assert Sampler({EOS})(x, reqs)[0] == x.argmax(-1).tolist()
