"""One sampling step, 32 rows x 49,152 vocab (SmolLM2's), per-row sampler (tests/engine/sampler_oracle.py) vs the
batched one (server/engine/sampler.py), on the CPU: the two alternate step by step (a shared host's load hits
both alike) and each reports its fastest step, per parameter mix.

    python -m bench.sampler_step [--rows 32] [--vocab 49152] [--repeats 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler

MIXES = {
    "greedy": dict(temperature=0.0),
    "greedy+penalties": dict(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5),
    "temperature": dict(temperature=0.8, seed=1),
    "top-k 50 + top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9, seed=1),
    "top-p 0.95 + logprobs 5": dict(temperature=1.0, top_p=0.95, logprobs=True, top_logprobs=5, seed=1),
}


def fastest_ms(samplers, logits, reqs, repeats: int) -> list[float]:
    times = [[] for _ in samplers]
    for _ in range(repeats):
        for sampler, spent in zip(samplers, times):
            start = time.perf_counter()
            sampler(logits, reqs)
            spent.append(time.perf_counter() - start)
    return [1e3 * min(spent) for spent in times]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))
    from sampler_oracle import RowSampler  # the per-row sampler, kept as the tests' oracle

    logits = torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(0)) * 4
    print(f"{args.rows} rows x {args.vocab} vocab, {torch.get_num_threads()} torch thread(s), fastest ms a step")
    print(f"{'parameters':28s} {'per-row':>9s} {'batched':>9s}")
    for name, params in MIXES.items():
        reqs = [Request(f"r{i}", list(range(i, i + 20)), SamplingParams(**params)) for i in range(args.rows)]
        for r in reqs:
            r.output_token_ids = list(range(100, 110))
        old, new = fastest_ms([RowSampler({2}), Sampler({2})], logits, reqs, args.repeats)
        print(f"{name:28s} {old:9.2f} {new:9.2f}")


if __name__ == "__main__":
    main()
