"""Trace: when one request was sent and when each of its tokens arrived; summarize() turns traces into the
reported numbers. Every system under test produces Traces, so every number is computed the same way."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    """One request as its client saw it (time.perf_counter seconds)."""

    sent: float
    arrivals: list[float] = field(default_factory=list)  # one per increment received
    counts: list[int] = field(default_factory=list)  # tokens in each increment

    def add(self, now: float, tokens: int) -> None:
        if tokens:
            self.arrivals.append(now)
            self.counts.append(tokens)

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    @property
    def itls(self) -> list[float]:
        """Inter-token latency, per token: an increment of n tokens after a gap g counts n gaps of g / n."""
        return self.itls_from(float("-inf"))

    def itls_from(self, start: float) -> list[float]:
        """``itls`` of the increments that arrived after a gap beginning at or after ``start``."""
        out = []
        for prev, now, n in zip(self.arrivals, self.arrivals[1:], self.counts[1:]):
            if prev >= start:
                out += [(now - prev) / n] * n
        return out

    @property
    def mean_itl(self) -> float | None:
        """Seconds per token after the first (None for a single token)."""
        tokens = self.tokens - self.counts[0]
        return (self.arrivals[-1] - self.arrivals[0]) / tokens if tokens else None


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1e3 if values else None  # ms


def summarize(traces: list[Trace]) -> dict:
    """Output tok/s over the whole batch (first send -> last token); TTFT and ITL p50/p99 in ms."""
    traces = [t for t in traces if t.arrivals]
    if not traces:
        return {"requests": 0}
    start = min(t.sent for t in traces)
    end = max(t.arrivals[-1] for t in traces)
    tokens = sum(t.tokens for t in traces)
    ttfts = [t.ttft for t in traces]
    return {"requests": len(traces), "tokens": tokens, "seconds": end - start,
            "tok_s": tokens / (end - start), "ttft_p50_ms": _pct(ttfts, 50), "ttft_p99_ms": _pct(ttfts, 99),
            **_itl_pcts([x for t in traces for x in t.itls])}


def _itl_pcts(itls: list[float]) -> dict:
    return {"itl_p50_ms": _pct(itls, 50), "itl_p99_ms": _pct(itls, 99)}


def steady_itl(traces: list[Trace]) -> dict:
    """ITL p50 / p99 (ms) over the gaps that begin once every stream has its first token: the streams' shared
    decode, without the first gap of a request whose prefill step ran before the others had arrived (over HTTP
    the requests of one burst reach the server a few ms apart, and the first one or two are prefilled alone;
    their next token then waits for the rest's prefill step: a 1.5-2 s gap, enough to set a p99 of 16 streams)."""
    traces = [t for t in traces if t.arrivals]
    start = max(t.arrivals[0] for t in traces)
    return _itl_pcts([x for t in traces for x in t.itls_from(start)])


def goodput(traces: list[Trace], ttft_s: float, itl_s: float) -> dict:
    """Requests meeting the SLO (TTFT <= ttft_s and mean ITL <= itl_s; a one-token request has no ITL to
    miss): their share of all requests, and their rate over the run (first send -> last token)."""
    done = [t for t in traces if t.arrivals]
    good = sum(t.ttft <= ttft_s and (t.mean_itl is None or t.mean_itl <= itl_s) for t in done)
    seconds = max(t.arrivals[-1] for t in done) - min(t.sent for t in done) if done else 0.0
    return {"good": good, "of": len(traces), "share": good / len(traces) if traces else None,
            "good_req_s": good / seconds if seconds else None}


def median_range(values: list[float | None]) -> dict:
    """{"median", "min", "max", "n"} of the rounds' values (None values, e.g. a missing ratio, are left out)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs)), "n": len(xs)}


class StepClock:
    """A transformers LogitsProcessor that timestamps every decoding step of ``generate`` (all rows at once).

    The timestamp is taken after the forward and before sampling, i.e. when the step's logits are ready.
    """

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:  # kernels run ahead of Python: wait until the logits really exist
            import torch

            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores

    def traces(self, sent: float, rows: int) -> list[Trace]:
        return [Trace(sent, list(self.times), [1] * len(self.times)) for _ in range(rows)]


def percentile_ms(values: list[float], q: float = 50) -> float | None:
    return _pct(values, q)


class SectionClock:
    """Wall seconds of each section of a run, in the order they ran: results["section_seconds"], so a results
    file (and BENCHMARKS.md) says what a preset costs and where, e.g. when sizing a preset to a time budget.
    A section timed twice adds up; a section that fails still gets its time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}  # CPU time of this process and the children it waited for

    @contextlib.contextmanager
    def section(self, name: str):
        start, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            took, used = time.perf_counter() - start, cpu_seconds() - cpu
            self.seconds[name] = round(self.seconds.get(name, 0.0) + took, 1)
            self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + used, 1)
            logging.getLogger("bench").info("%s took %.0fs (CPU %.0fs)", name, took, used)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited (servers, converters,
    GuideLLM, the memory subprocesses). On a shared machine a section's wall time grows with the other jobs'
    load; its CPU time much less, so the two together say what the run costs on an idle machine."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def section_summary(seconds: dict[str, float], wall: float | None = None) -> str:
    """"13.0 min: grid 2.1, traffic 4.2, ..., the rest 0.4" (minutes; "the rest": wall time outside every
    section: imports, fixtures, writing the outputs)."""
    parts = [f"{name} {s / 60:.1f}" for name, s in seconds.items()]
    if wall is not None:
        rest = wall - sum(seconds.values())
        if rest >= 0.05 * 60:
            parts.append(f"the rest {rest / 60:.1f}")
    total = wall if wall is not None else sum(seconds.values())
    return f"{total / 60:.1f} min: " + ", ".join(parts)
