"""Sampler: per-row parameters and generators; a row's token depends only on its own logits, parameters and
seed, never on what else is in the batch. Pure torch, no model."""
from __future__ import annotations

import itertools

import pytest
import torch

from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler, row_max

VOCAB = 50
EOS = 2
_ids = itertools.count()


def req(output=(), prompt=(1, 3, 4), **params) -> Request:
    r = Request(f"s{next(_ids)}", list(prompt), SamplingParams(**params))
    r.output_token_ids = list(output)
    return r


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw(sampler: Sampler, row: torch.Tensor, r: Request, n: int) -> list[int]:
    return [sampler(row[None], [r])[0][0] for _ in range(n)]


def test_greedy_is_argmax_per_row():
    x = logits(5)
    tokens, lps, tops = Sampler({EOS}).__call__(x, [req(temperature=0.0) for _ in range(5)])
    assert tokens == x.argmax(-1).tolist()
    assert lps == [None] * 5 and tops == [None] * 5


def test_row_max_is_torch_max_with_nan_inf_ties_and_views():
    """The CPU fast path (numpy's argmax) gives torch's max(-1): the first maximal index, a NaN row's NaN (its
    first NaN's index), +inf; on a slice of a larger logits tensor too (the runner's rows to sample)."""
    x = logits(9, seed=4)
    x[1, 7] = x[1, 30] = float("nan")
    x[2, 11] = float("inf")
    x[3] = 1.0  # a tie over the whole row: index 0
    x[4, 5] = x[4, 40] = 100.0
    x[5, :10] = -float("inf")
    for view in (x, x[2:7], x[:, :40]):
        top, index = row_max(view)
        want_top, want_index = view.max(-1)
        assert index.tolist() == want_index.tolist() and index.dtype == want_index.dtype
        assert torch.equal(top.isnan(), want_top.isnan()) and torch.equal(top.nan_to_num(), want_top.nan_to_num())


def test_logprobs_and_top_logprobs_are_the_raw_distribution():
    """The chosen token's logprob and the top-n come from the model's log-softmax, before penalties and
    temperature (what vLLM returns by default); top-n is sorted, and absent unless asked for."""
    x = logits(3)
    reqs = [req(temperature=0.0, logprobs=True, top_logprobs=4), req(temperature=0.0, logprobs=True),
            req(temperature=0.7, repetition_penalty=1.5, logprobs=True, top_logprobs=2, seed=1)]
    tokens, lps, tops = Sampler({EOS})(x, reqs)
    ref = torch.log_softmax(x, -1)
    for i, (token, lp) in enumerate(zip(tokens, lps)):
        assert lp == pytest.approx(float(ref[i, token]), abs=1e-6)
    values, ids = ref[0].topk(4)
    assert [i for i, _ in tops[0]] == ids.tolist()
    assert [v for _, v in tops[0]] == pytest.approx(values.tolist(), abs=1e-6)
    assert tops[1] is None and len(tops[2]) == 2 and tops[2][0][1] >= tops[2][1][1]


def test_top_k_one_equals_greedy_whatever_the_temperature():
    x = logits(6, seed=1)
    sampler = Sampler({EOS})
    for temperature in (0.5, 1.0, 3.0):
        tokens, _, _ = sampler(x, [req(temperature=temperature, top_k=1) for _ in range(6)])
        assert tokens == x.argmax(-1).tolist()


def test_logprobs_are_log_softmax_of_raw_logits_at_the_chosen_token():
    x = logits(4, seed=2)
    rows = [req(temperature=0.0, logprobs=True), req(temperature=0.7, seed=3, logprobs=True),
            req(temperature=0.0, logprobs=True, repetition_penalty=1.5), req(temperature=0.0)]
    tokens, lps, _ = Sampler({EOS})(x, rows)
    ref = torch.log_softmax(x, -1)
    for i in range(3):
        assert lps[i] == pytest.approx(float(ref[i, tokens[i]]), abs=1e-6)
    assert lps[3] is None


def test_seeded_row_is_reproducible_whatever_else_is_batched():
    x = logits(4, seed=4)
    alone = Sampler({EOS}, seed=0)
    target = req(temperature=1.0, top_p=0.9, seed=1234)
    solo = [alone(x[2:3], [target])[0][0] for _ in range(20)]
    alone.forget(target.request_id)

    batched = Sampler({EOS}, seed=99)  # a different engine seed and unseeded neighbours
    target2 = req(temperature=1.0, top_p=0.9, seed=1234)
    out = []
    for step in range(20):
        neighbours = [req(temperature=1.3), req(temperature=0.8, seed=step)]
        tokens, _, _ = batched(torch.stack([x[0], x[2], x[3]]), [neighbours[0], target2, neighbours[1]])
        out.append(tokens[1])
    assert out == solo
    assert len(set(solo)) > 1  # really sampled, not argmax


def test_same_seed_same_tokens_different_seed_different_tokens():
    x = logits(1, seed=5)[0]
    a = draw(Sampler({EOS}), x, req(temperature=1.0, seed=7), 30)
    b = draw(Sampler({EOS}), x, req(temperature=1.0, seed=7), 30)
    c = draw(Sampler({EOS}), x, req(temperature=1.0, seed=8), 30)
    assert a == b
    assert a != c


def test_forget_restarts_a_seeded_stream():
    x = logits(1, seed=6)[0]
    sampler = Sampler({EOS})
    r = req(temperature=1.0, seed=11)
    first = draw(sampler, x, r, 10)
    sampler.forget(r.request_id)
    assert draw(sampler, x, r, 10) == first


def test_top_k_limits_the_support():
    x = logits(1, seed=7)[0]
    allowed = set(torch.topk(x, 3).indices.tolist())
    seen = set(draw(Sampler({EOS}), x, req(temperature=5.0, top_k=3, seed=1), 300))
    assert seen == allowed  # all three reachable at a high temperature, nothing else


def test_top_p_keeps_the_smallest_nucleus():
    x = torch.full((VOCAB,), -10.0)
    x[[5, 9, 20, 30]] = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler({EOS})
    seen = set(draw(sampler, x, req(temperature=1.0, top_p=0.75, seed=2), 300))
    assert seen == {5, 9}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the nucleus is {5, 9}
    assert set(draw(sampler, x, req(temperature=1.0, top_p=0.01, seed=3), 50)) == {5}  # top token always kept


def test_temperature_sharpens_and_flattens():
    x = torch.linspace(0.0, 5.0, VOCAB)[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(8))]
    top = int(x.argmax())  # ~0.1 above the runner-up: e^-10 less likely at T=0.01
    cold = draw(Sampler({EOS}), x, req(temperature=0.01, seed=1), 100)
    hot = draw(Sampler({EOS}), x, req(temperature=20.0, seed=1), 100)
    assert cold == [top] * 100
    assert len(set(hot)) > 20


def test_sampled_frequencies_follow_softmax():
    x = torch.tensor([0.0, 1.0, 2.0] + [-30.0] * (VOCAB - 3))
    n = 4000
    counts = torch.bincount(torch.tensor(draw(Sampler({EOS}), x, req(temperature=1.0, seed=5), n)), minlength=VOCAB)
    expected = torch.softmax(x, -1)[:3] * n
    assert torch.all((counts[:3] - expected).abs() < 5 * expected.sqrt())  # within 5 sigma


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits(1, seed=9)
    prompt, output = [3, 7, 7, 11], [int(x.argmax()), 40]
    r = req(output=output, prompt=prompt, temperature=0.0, repetition_penalty=1.8)
    ids = torch.tensor([prompt + output])
    expected = RepetitionPenaltyLogitsProcessor(1.8)(ids, x.clone())
    tokens, _, _ = Sampler({EOS})(x, [r])
    assert tokens == [int(expected.argmax())]
    assert tokens != [int(x.argmax())]  # the penalty changed the choice


def test_min_tokens_bans_eos_and_stop_token_ids_until_reached():
    x = torch.zeros(1, VOCAB)
    x[0, EOS], x[0, 17], x[0, 30] = 10.0, 9.0, 1.0
    sampler = Sampler({EOS})
    early = req(output=[5], temperature=0.0, min_tokens=3, stop_token_ids=[17])
    assert sampler(x, [early])[0] == [30]
    reached = req(output=[5, 6, 7], temperature=0.0, min_tokens=3, stop_token_ids=[17])
    assert sampler(x, [reached])[0] == [EOS]
    ignoring = req(output=[5], temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=[17])
    assert sampler(x, [ignoring])[0] == [EOS]  # ignore_eos: EOS is an ordinary token, only stop ids are banned


def test_min_tokens_ban_also_applies_when_sampling():
    x = torch.zeros(1, VOCAB)
    x[0, EOS] = 8.0
    r = req(output=[], temperature=1.0, seed=3, min_tokens=5)
    assert EOS not in draw(Sampler({EOS}), x[0], r, 100)


def test_sampler_does_not_modify_the_logits():
    x = logits(2, seed=10)
    before = x.clone()
    Sampler({EOS})(x, [req(temperature=0.0, repetition_penalty=2.0, output=[1, 2]),
                       req(temperature=0.5, top_k=4, min_tokens=9, seed=1)])
    assert torch.equal(x, before)


def test_presence_and_frequency_penalties_follow_openai():
    """logit[t] -= presence * (t generated) + frequency * count(t generated); prompt tokens are not counted."""

    logits = torch.tensor([[3.0, 2.9, 2.5, 0.0]])
    req = Request("r", [2, 2, 2], SamplingParams(temperature=0, presence_penalty=0.05, frequency_penalty=0.1))
    req.output_token_ids = [0, 0]  # token 0 twice: 3.0 - 0.05 - 0.2 = 2.75 < 2.9
    assert Sampler(set())(logits, [req])[0] == [1]
    req.params.frequency_penalty = 0.0  # 3.0 - 0.05 = 2.95 > 2.9
    assert Sampler(set())(logits, [req])[0] == [0]


def test_logit_bias_is_added_to_the_logits_before_everything_else():
    """OpenAI's logit_bias: greedy picks from the biased logits; a seeded draw with a bias equals the same seed's
    draw from logits with the bias already added; the bias comes before the repetition penalty (vLLM's order);
    logprobs stay the raw model's."""
    x = logits(3, seed=9)
    top = int(x[0].argmax())
    forced, banned = req(temperature=0.0, logit_bias={7: 100.0}), req(temperature=0.0, logit_bias={top: -100.0})
    tokens, _, _ = Sampler({EOS})(x[:2].clone(), [forced, req(temperature=0.0, logprobs=True)])
    assert tokens == [7, int(x[1].argmax())]
    assert Sampler({EOS})(x[:1], [banned])[0] == [int(x[0].sort(descending=True).indices[1])]

    bias = {3: 2.5, 11: -1.0, 40: 4.0}
    shifted = x[2].clone()
    for t, b in bias.items():
        shifted[t] += b
    biased = draw(Sampler({EOS}), x[2], req(temperature=1.0, top_p=0.95, seed=5, logit_bias=bias), 25)
    plain = draw(Sampler({EOS}), shifted, req(temperature=1.0, top_p=0.95, seed=5), 25)
    assert biased == plain and len(set(biased)) > 1

    # token 0, seen in the prompt: bias first, -1 + 2 = 1, then / 1.5 (now positive) = 0.67 > 0.6: token 0;
    # the penalty first would give -1 * 1.5 + 2 = 0.5 < 0.6: token 1
    row = torch.tensor([[-1.0, 0.6, 0.0, 0.0]])
    r = req(temperature=0.0, repetition_penalty=1.5, logit_bias={0: 2.0}, prompt=(0,), logprobs=True)
    tokens, lps, _ = Sampler(set())(row, [r])
    assert tokens == [0] and lps[0] == pytest.approx(float(torch.log_softmax(row[0], -1)[0]), abs=1e-6)


def test_min_p_drops_tokens_below_its_share_of_the_top_probability():
    """vLLM's min_p, after temperature: a seeded draw equals the same seed's draw from logits with every token
    under min_p x the top probability (of the tempered distribution) set to -inf; min_p 1 keeps only the top."""
    x = logits(2, seed=11)
    temperature, min_p = 0.8, 0.2
    probs = torch.softmax(x[0] / temperature, -1)
    masked = x[0].masked_fill(probs < min_p * probs.max(), float("-inf"))
    assert 1 < int(torch.isfinite(masked).sum()) < VOCAB  # the cut is real and keeps several tokens
    with_min_p = draw(Sampler({EOS}), x[0], req(temperature=temperature, min_p=min_p, seed=3), 30)
    by_hand = draw(Sampler({EOS}), masked, req(temperature=temperature, seed=3), 30)
    assert with_min_p == by_hand and len(set(with_min_p)) > 1
    assert set(with_min_p) <= set(torch.isfinite(masked).nonzero()[:, 0].tolist())
    assert draw(Sampler({EOS}), x[1], req(temperature=1.5, min_p=1.0, seed=4), 10) == [int(x[1].argmax())] * 10


def test_allowed_token_ids_restrict_greedy_and_sampling_to_the_set():
    """vLLM's allowed_token_ids: greedy takes the best allowed token, a draw never leaves the set, a row without
    the field beside it is untouched; logprobs stay the raw model's."""
    x = logits(3, seed=12)
    allowed = [5, 9, 17, 30]
    best = max(allowed, key=lambda t: float(x[0, t]))
    rows = [req(temperature=0.0, allowed_token_ids=allowed, logprobs=True), req(temperature=0.0),
            req(temperature=2.0, seed=6, allowed_token_ids=allowed)]
    sampler = Sampler({EOS})
    drawn = set()
    for _ in range(30):
        tokens, lps, _ = sampler(x, rows)
        assert tokens[:2] == [best, int(x[1].argmax())]
        drawn.add(tokens[2])
    assert drawn <= set(allowed) and len(drawn) > 1
    assert lps[0] == pytest.approx(float(torch.log_softmax(x[0], -1)[best]), abs=1e-6)
