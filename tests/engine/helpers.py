"""Engine test helpers: the PEFT oracle, LLMEngine stepping with per-step invariants, AsyncEngine observers."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from pathlib import Path

import torch

import support
from server.config import EngineConfig
from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.request import AdapterUse, Request, RequestOutput, SamplingParams


KINDS = ("lora", "rslora", "lora_pattern", "dora", "ia3", "adalora", "lora2")
FFFD = "\ufffd"


def config(model_dir, root, **overrides) -> EngineConfig:
    return EngineConfig(**{"model": str(model_dir), "max_loras": 2, "max_cpu_loras": 16, "max_lora_rank": 8,
                           "max_num_seqs": 4, "max_model_len": 128, "max_num_batched_tokens": 256,
                           "adapter_roots": [str(root)], **overrides})


class Oracle:
    """PEFT greedy decoding (full recompute each token, no cache) per adapter directory; memoised."""

    def __init__(self, model_dir: Path, root: Path):
        self.model_dir, self.root = model_dir, root
        self.models: dict = {}
        self.runs: dict = {}

    def model(self, kind: str | None):
        if kind not in self.models:
            self.models[kind] = support.peft_model_for(self.model_dir, None if kind is None else self.root / kind)
        return self.models[kind]

    @torch.inference_mode()
    def greedy(self, kind: str | None, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        tokens, logprobs = self.runs.get((kind, tuple(prompt)), ([], []))
        if len(tokens) < n:
            tokens, logprobs = [], []
            ids = list(prompt)
            for _ in range(n):
                logits = self.model(kind)(torch.tensor([ids])).logits[0, -1].float()
                token = int(logits.argmax())
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                ids.append(token)
            self.runs[(kind, tuple(prompt))] = (tokens, logprobs)
        return tokens[:n], logprobs[:n]


_rid = itertools.count()


def encode(eng, text: str) -> list[int]:
    return eng.tokenizer.encode(text, add_special_tokens=False)


def submit(eng: LLMEngine, prompt: list[int], adapter: str | list | None = None, wait: bool = True,
           request_id: str | None = None, **params) -> Request:
    """Queue a request on an LLMEngine the way AsyncEngine.add_request does: resolve its adapters, hold them
    (in_flight), start their host loads. ``adapter``: a name, or a mixture [(name, scale), ...]. Greedy and
    ignore_eos unless told otherwise."""
    params = {"temperature": 0.0, "ignore_eos": True, **params}
    mix = [] if adapter is None else [(adapter, 1.0)] if isinstance(adapter, str) else list(adapter)
    uses = tuple(AdapterUse(name, eng.store.resolve(name), scale) for name, scale in mix)
    for use in uses:
        eng.store.acquire(use.entry)
        future = eng.store.ensure_host(use.entry)
        if wait:
            future.result(timeout=30)
    req = Request(request_id or f"e{next(_rid)}", list(prompt), SamplingParams(**params), uses)
    eng.scheduler.waiting.append(req)
    return req


def step(eng: LLMEngine, outputs: dict | None = None, strict_slots: bool = True) -> list[tuple[Request, RequestOutput]]:
    """One engine step, then the per-step invariants: at most max_loras adapters among running requests and on
    device, and (without pinned adapters in play) every running request's adapter is resident."""
    outs = eng.step()
    keys = {k for r in eng.scheduler.running for k in r.adapter_keys}
    slots = eng.runner.manager.slot_of
    assert len(keys) <= eng.config.max_loras and len(slots) <= eng.config.max_loras
    assert len(eng.scheduler.running) <= eng.config.max_num_seqs
    if strict_slots:
        assert keys <= set(slots), (keys, list(slots))
    if outputs is not None:
        for req, out in outs:
            outputs.setdefault(req.request_id, []).append(out)
    return outs


def drain(eng: LLMEngine, outputs: dict | None = None, max_steps: int = 200, **kw) -> int:
    for n in range(1, max_steps + 1):
        step(eng, outputs, **kw)
        if not eng.scheduler.has_work:
            return n
    raise AssertionError(f"engine still busy after {max_steps} steps")


def run_alone(eng: LLMEngine, prompt, adapter=None, **params) -> Request:
    req = submit(eng, prompt, adapter, **params)
    drain(eng)
    return req


def streamed(outs: list[RequestOutput]) -> tuple[list[int], str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


def decode(eng, tokens: list[int]) -> str:
    return eng.tokenizer.decode(tokens, skip_special_tokens=True)


def start(loop, cfg: EngineConfig) -> AsyncEngine:
    eng = AsyncEngine(cfg)
    loop.run_until_complete(eng.start())
    return eng


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, str]] = []
        self.finished: dict[str, Request] = {}

    def on_adapter_event(self, event, name, seconds):
        self.events.append((event, name))

    def on_request_finished(self, req):
        self.finished[req.request_id] = req

    def count(self, event, name):
        return self.events.count((event, name))


class Hold:
    """Parks the step thread when request ``rid`` reaches ``n`` output tokens, until ``go`` is set: the request
    is then provably mid-generation while the test acts."""

    def __init__(self, rid: str, n: int):
        self.rid, self.n = rid, n
        self.reached, self.go = threading.Event(), threading.Event()

    def on_token(self, req, now):
        if req.request_id == self.rid and len(req.output_token_ids) == self.n:
            self.reached.set()
            self.go.wait(30)


async def until(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def wait_event(ev: threading.Event, timeout: float = 20.0):
    await until(ev.is_set, timeout, "step thread to reach the hold point")


async def collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)
