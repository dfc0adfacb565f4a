"""Where a swapserve decode step spends its time: `python -m bench.profile_step [--rows 32] [--adapters 16] [--cpu-gemm auto]`.

Drives LLMEngine synchronously (no step thread), so the numbers are the step itself: first the mean decode
step time with 0, 1, 4 and k distinct adapters over the same rows, then torch.profiler's top ops and
(with --cprofile) cProfile's top Python functions. Prints as it goes and writes
bench/results/profile-step.txt.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.config import BenchConfig, auto_threads  # noqa: E402
from bench.fixtures import make_adapters, model_dir  # noqa: E402
from bench.request_set import PromptSource  # noqa: E402


def build_engine(directory: Path, root: Path, rows: int, slots: int, prompt_tokens: int, cpu_gemm: str = "auto"):
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine

    cfg = EngineConfig(model=str(directory), dtype="float32", device="cpu",
                       threads=torch.get_num_threads(), max_loras=slots, max_lora_rank=16,
                       max_num_seqs=rows, max_model_len=prompt_tokens + 128, adapter_roots=[str(root)],
                       cpu_gemm=cpu_gemm)
    engine = LLMEngine(cfg)
    for entry in [engine.store.resolve(p.name) for p in root.iterdir()]:
        engine.store.ensure_host(entry).result()
    engine.runner.kv_resident.wait()  # no step races the thread that populates the KV pool
    return engine


def admit(engine, batch: list[list[int]], adapters: list[str | None], max_tokens: int) -> None:
    """What AsyncEngine.add_request does, minus validation and queues."""
    from server.engine.request import AdapterUse, Request, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(batch):
        name = adapters[i % len(adapters)]
        uses = () if name is None else (AdapterUse(name, engine.store.resolve(name)),)
        for use in uses:
            engine.store.acquire(use.entry)
        engine.scheduler.waiting.append(Request(f"p{i}", prompt, params, uses))


def prefilling(engine) -> bool:
    """Some admitted request has prompt tokens left to compute (waiting, or its prefill chunked over steps)."""
    sched = engine.scheduler
    return bool(sched.waiting) or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.running)


def decode_steps(engine, batch, adapters, steps: int, warm: int = 1, profiler=None) -> list[float]:
    """Seconds of each of ``steps`` decode steps (after prefill and ``warm`` steps); runs the rows to the end."""
    admit(engine, batch, adapters, warm + steps + 1)
    while prefilling(engine):  # the prompts, in as many steps as the token budget takes
        engine.step()
    for _ in range(warm):
        engine.step()
    if profiler:
        profiler.enable() if isinstance(profiler, cProfile.Profile) else profiler.__enter__()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    if profiler:
        profiler.disable() if isinstance(profiler, cProfile.Profile) else profiler.__exit__(None, None, None)
    while engine.scheduler.has_work:
        engine.step()
    return times


def say(out: list[str], text: str) -> None:
    print(text, flush=True)
    out.append(text)


def step_times(engine, batch, names: list[str], steps: int, rounds: int = 2) -> dict[tuple[int, str], list[float]]:
    """Decode step seconds per (distinct-adapter count, LoRA path), interleaved over ``rounds``. The path is
    switched on the same engine (its LoRA backend: torch ops, or the numba kernel as the server chose it), so both
    see the same weights."""
    from server.layers import kernels
    from server.layers.lora_backend import NumbaLora, TorchLora

    counts = sorted({0, 1, min(4, len(names)), len(names)})
    holder = engine.runner.holder
    chosen = holder.backend
    paths = {"reference": TorchLora()}
    if kernels.available():
        paths["numba"] = chosen if isinstance(chosen, NumbaLora) else NumbaLora(kernels.max_run(torch.get_num_threads()))
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for c in counts:
            for path, backend in paths.items():
                if c == 0 and path != "reference":
                    continue  # no adapter: both paths are the plain base model
                holder.backend = backend
                times.setdefault((c, path), []).extend(decode_steps(engine, batch, names[:c] or [None], steps))
    holder.backend = chosen
    return times


@contextlib.contextmanager
def kernel_visible_to_profiler():
    """torch.profiler sees aten ops only: give the compiled kernel's calls a named range while profiling
    (kept off the hot path otherwise)."""
    from server.layers import kernels

    inner = kernels.lora_runs

    def traced(*args):
        with torch.profiler.record_function("swapserve::lora_runs"):
            inner(*args)

    kernels.lora_runs = traced
    try:
        yield
    finally:
        kernels.lora_runs = inner


CATEGORIES = (  # (label, test on (op name, input shapes)); first match wins
    ("LoRA kernel (numba, shrink + expand)", lambda n, s, r: n == "swapserve::lora_runs"),
    ("LoRA matmuls (shrink x@A.T, expand @B)", lambda n, s, r: n == "aten::mm" and _has_dim(s, r)),
    ("base matmuls (the model's linears, lm_head)",
     lambda n, s, r: n in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise")),
    ("LoRA gather/scatter (index_select, index_add_)",
     lambda n, s, r: n in ("aten::index_select", "aten::index_add_", "aten::scatter_add_")),
    ("views/indexing (select, slice, as_strided, permute, t, view)",
     lambda n, s, r: n in ("aten::select", "aten::slice", "aten::as_strided", "aten::permute", "aten::t",
                           "aten::numpy_T", "aten::view", "aten::reshape", "aten::transpose", "aten::expand",
                           "aten::unsqueeze", "aten::_reshape_alias", "aten::alias")),
    ("attention (sdpa)", lambda n, s, r: "scaled_dot_product" in n),
)


def _has_dim(shapes, rank: int) -> bool:
    return any(rank in shape for shape in shapes if shape)


def categories(prof, rank: int, steps: int) -> list[str]:
    """ms per step by what the op is for (self CPU time; matmuls told apart by the LoRA rank in their shapes)."""
    totals: dict[str, float] = {}
    for evt in prof.key_averages(group_by_input_shape=True):
        label = next((lab for lab, test in CATEGORIES if test(evt.key, evt.input_shapes or [], rank)), "other")
        totals[label] = totals.get(label, 0.0) + evt.self_cpu_time_total / 1e3 / steps
    whole = sum(totals.values())
    return [f"  {ms:8.1f} ms/step  {ms / whole * 100:5.1f}%  {label}"
            for label, ms in sorted(totals.items(), key=lambda kv: -kv[1])]


def run(rows: int, k: int, steps: int, threads: int, with_cprofile: bool, cpu_gemm: str = "auto") -> str:
    torch.set_num_threads(threads or auto_threads())
    threads = torch.get_num_threads()
    defaults = BenchConfig()
    directory = model_dir("", defaults.cache_dir)
    with tempfile.TemporaryDirectory(prefix="swapserve-profile-") as tmp:
        names = [f"a{i:02d}" for i in range(k)]
        make_adapters(directory, names, Path(tmp), defaults.lora_rank, 0)
        engine = build_engine(directory, Path(tmp), rows, k, defaults.prompt_tokens, cpu_gemm)
        batch = PromptSource(len(engine.tokenizer), defaults.prompt_tokens, 0).take(rows)
        out: list[str] = []
        from server.layers.gemm import PackedLinear

        gemm = "oneDNN, packed" if any(isinstance(l.base_layer, PackedLinear)
                                       for l in engine.runner.layers.values()) else "torch F.linear"
        say(out, f"decode step, {rows} rows, {threads} threads, base linears on {gemm}, load average {os.getloadavg()[0]:.2f} "
            "(median / min over interleaved rounds):")
        for (count, path), times in step_times(engine, batch, names, steps).items():
            med, low = statistics.median(times) * 1e3, min(times) * 1e3
            say(out, f"  {count:3d} distinct adapters, {'no adapter' if count == 0 else path + (' ops' if path == 'reference' else ' kernel'):12s}: "
                f"{med:7.1f} / {low:7.1f} ms/step  ({rows / med * 1e3:.1f} tok/s)")
        from server.layers.mapping import ALONE_MAX_RUN

        if rows > ALONE_MAX_RUN:
            say(out, f"  (1 distinct adapter: a step on one adapter alone with more than {ALONE_MAX_RUN} tokens keeps "
                "its no-gather addmm under either setting)")
        from torch.profiler import ProfilerActivity, profile

        with_torch = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
        with kernel_visible_to_profiler():
            decode_steps(engine, batch, names, steps, profiler=with_torch)
        path = "numba kernel" if engine.runner.holder.backend.name == "numba" else "torch ops"
        say(out, f"\ntorch.profiler, {steps} decode steps with {k} adapters ({path}), self CPU time by purpose:")
        say(out, "\n".join(categories(with_torch, defaults.lora_rank, steps)))
        say(out, "\ntop ops by self CPU time:\n"
            + with_torch.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        if with_cprofile:
            prof = cProfile.Profile()
            decode_steps(engine, batch, names, steps, profiler=prof)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
            say(out, f"cProfile, {steps} decode steps with {k} adapters (top functions by own time):\n"
                + text.getvalue())
        engine.store.close()
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cprofile", action="store_true", help="also cProfile (slow: Python-level tracing)")
    p.add_argument("--threads", type=int, default=0, help="0 = auto (the CPUs not already busy)")
    p.add_argument("--cpu-gemm", default="auto", choices=("auto", "onednn", "torch"),
                   help="the server's --cpu-gemm: how the base model's linears multiply")
    p.add_argument("--out", default="bench/results/profile-step.txt")
    args = p.parse_args()
    report = run(args.rows, args.adapters, args.steps, args.threads, args.cprofile, args.cpu_gemm)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
