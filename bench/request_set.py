"""The traffic workloads' requests: random prompts, long-tailed lengths and Poisson arrival times, each drawn
from a generator seeded by (seed, workload, round, cell), so a workload sends the same requests in every run
and on every engine version, and no two cell runs share a prompt (no accidental prefix-cache hits)."""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

FIRST_TOKEN = 1000  # prompts use ids from here up (clear of the special tokens at the bottom of a vocabulary)


def rng_for(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator for one (workload, round, cell, ...) key; strings enter by their CRC-32."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) if isinstance(k, str) else k for k in keys)])


def random_prompt(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    """``length`` token ids drawn uniformly from [min(FIRST_TOKEN, vocab // 4), vocab)."""
    return rng.integers(min(FIRST_TOKEN, vocab // 4), vocab, size=length).tolist()


class PromptSource:
    """Prompts of ``length`` random token ids, new ones on every ``take``: each call draws from its own generator
    (seed, call number), so a run is reproducible and no two measured runs share a prompt. A repeated prompt
    would be served from the prefix cache on its second run, and a cell that happens to repeat more than
    another (or than an anchor that has no cache) would be measured on less work."""

    def __init__(self, vocab: int, length: int, seed: int):
        self.vocab, self.length, self.seed = vocab, length, seed
        self.calls = 0

    def take(self, n: int, length: int | None = None) -> list[list[int]]:
        rng = self._next()
        return [random_prompt(rng, length or self.length, self.vocab) for _ in range(n)]

    def renew(self, reqs: list) -> list:
        """Copies of ``reqs`` (BenchRequests) with fresh prompts, each as long as the one it replaces."""
        rng = self._next()
        return [dataclasses.replace(r, prompt=random_prompt(rng, len(r.prompt), self.vocab)) for r in reqs]

    def _next(self) -> np.random.Generator:
        self.calls += 1
        return rng_for(self.seed, "prompts", self.calls - 1)


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    """``n`` lengths from a lognormal (median ``median``, ``sigma`` the log's standard deviation: a long right
    tail), rounded and clipped to [lo, hi], in a random order. Stratified, not sampled: the lengths are the
    distribution's quantiles at (i + 1/2) / n, so a small set has the tail it stands for (32 independent
    draws can miss it: one seed's 32 prompts at median 96, sigma 1 topped out at 314 tokens)."""
    z = np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])
    lengths = np.clip(np.rint(median * np.exp(sigma * z)), lo, hi).astype(int)
    return rng.permutation(lengths).tolist()


def poisson_offsets(gaps: list[float], rate: float) -> list[float]:
    """Send times (s from the start) of a Poisson process at ``rate`` requests/s, from unit-rate exponential
    gaps: one draw serves every rate, so the rates differ only in their time scale."""
    return (np.cumsum(gaps) / rate).tolist()


def round_robin(names: list, n: int) -> list:
    """Request i gets names[i % len(names)]."""
    return [names[i % len(names)] for i in range(n)]


@dataclass
class RequestSet:
    """(c)'s fixed request set: request i has ``prompt_lens[i]`` prompt tokens and ``output_lens[i]`` output
    tokens, and arrives ``gaps[0] + ... + gaps[i]`` seconds (unit rate; gaps[0] = 0) into the run."""

    prompt_lens: list[int]
    output_lens: list[int]
    gaps: list[float]

    @classmethod
    def long_tailed(cls, cfg, seed: int) -> "RequestSet":
        """cfg: a TrafficConfig (its poisson_requests, prompt_* and output_* fields)."""
        rng = rng_for(seed, "request-set")
        n = cfg.poisson_requests
        prompts = lognormal_lengths(rng, n, cfg.prompt_median, cfg.prompt_sigma, cfg.prompt_min, cfg.prompt_max)
        outputs = lognormal_lengths(rng, n, cfg.output_median, cfg.output_sigma, cfg.output_min, cfg.output_max)
        gaps = [0.0] + rng.exponential(1.0, size=n - 1).tolist()
        return cls(prompts, outputs, gaps)

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def prompts(self, vocab: int, seed: int, run: str) -> list[list[int]]:
        """Fresh token ids of the set's prompt lengths for one run (``run`` keys the draw)."""
        rng = rng_for(seed, "request-set-prompts", run)
        return [random_prompt(rng, n, vocab) for n in self.prompt_lens]

    def describe(self) -> dict:
        """Totals and quantiles of the lengths, for the report."""
        def stats(xs):
            return {"total": int(sum(xs)), "mean": float(np.mean(xs)), "p50": float(np.percentile(xs, 50)),
                    "p90": float(np.percentile(xs, 90)), "max": int(max(xs)), "min": int(min(xs))}

        return {"requests": len(self), "prompt": stats(self.prompt_lens), "output": stats(self.output_lens)}
