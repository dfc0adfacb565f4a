"""bench/profile_step.py times decode steps only: the prompts first run to their end, however many steps the
token budget splits them into."""
from __future__ import annotations

from types import SimpleNamespace

from bench.profile_step import prefilling


def engine(waiting, running):
    return SimpleNamespace(scheduler=SimpleNamespace(waiting=waiting, running=running))


def req(prompt: int, computed: int):
    return SimpleNamespace(prompt_token_ids=[1] * prompt, num_computed_tokens=computed)


def test_prefilling_until_every_prompt_is_computed():
    assert prefilling(engine([req(32, 0)], []))  # not admitted yet
    assert prefilling(engine([], [req(32, 32), req(32, 16)]))  # a prompt chunked over steps
    assert not prefilling(engine([], [req(32, 32), req(32, 33)]))  # all decoding
    assert not prefilling(engine([], []))
