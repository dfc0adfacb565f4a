"""Results on disk: bench/results/<preset>.json (the raw numbers + machine), <preset>.png (throughput vs
distinct adapters), and BENCHMARKS.md regenerated from the JSON.

Regenerate the markdown and chart from a saved run: ``python -m bench.report bench/results/quick.json``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SYSTEMS = (("base", "HF base"), ("base_onednn", "HF base, oneDNN linears"), ("swapserve", "swapserve"),
           ("peft", "PEFT mixed"), ("naive", "naive serial"))


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": _mem_gb(), "python": platform.python_version(),
            # the vector ISA torch's (and oneDNN's) CPU kernels dispatch to: AVX2 / AVX512; the same model name
            # has come with either on this project's VMs, and it moves every CPU number
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "git": machine_git(), "git_dirty": bool(_git("status", "--porcelain")),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _mem_gb() -> float | None:
    line = next((l for l in _read("/proc/meminfo").splitlines() if l.startswith("MemTotal")), None)
    return round(int(line.split()[1]) / 2**20, 1) if line else None


def loadavg() -> str:
    """The 1/5/15-minute load averages, "1.51 1.22 0.95" ("?" where the OS has none)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def cpu_probe(size: int = 512, repeats: int = 7) -> list[float] | None:
    """GFLOP/s of one thread's fp32 GEMM (``size``-square, the median of ``repeats``) on each CPU this process may
    run on, pinned there in turn (~0.1 s per CPU): a run taken on a slow hour or beside a busy neighbour says so
    (the host can slow one vCPU and not the other; swapserve's LoRA kernel runs on the second). None where the OS
    cannot pin threads."""
    from statistics import median

    import torch

    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = []
    try:
        torch.set_num_threads(1)
        for cpu in cpus:
            os.sched_setaffinity(0, {cpu})
            a @ b
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            out.append(round(2 * size**3 / median(times) / 1e9, 1))
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
    return out


def machine_git() -> str:
    """This tree's short commit ("" outside git)."""
    return _git("rev-parse", "--short", "HEAD")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def ratio(row: dict, num: str, den: str) -> float | None:
    a, b = row.get(num), row.get(den)
    return a["tok_s"] / b["tok_s"] if a and b and b.get("tok_s") else None


def save(results: dict, out_dir: str, preset: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{preset}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def chart(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    ns = sorted({c["concurrency"] for c in cells})
    fig, axes = plt.subplots(1, len(ns), figsize=(max(4.2 * len(ns), 7.0), 3.6), squeeze=False)  # one panel: room for the title
    for ax, n in zip(axes[0], ns):
        rows = sorted((c for c in cells if c["concurrency"] == n), key=lambda c: c["adapters"])
        for key, label in SYSTEMS:
            pts = [(c["adapters"], c[key]["tok_s"]) for c in rows if key in c]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ks = [c["adapters"] for c in rows]
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)
        ax.set_ylim(bottom=0)
        ax.set_title(f"{n} concurrent request{'s' if n > 1 else ''}")
        ax.set_xlabel("distinct adapters")
        ax.set_ylabel("output tok/s")
        ax.grid(alpha=0.3)
        if _peer_points(ax, results.get("peers"), n):
            ax.legend(fontsize=7)
    axes[0][0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"{results['model']} {cfg.get('dtype', 'float32')}, LoRA r{cfg['lora_rank']} all-linear, "
                 f"{cfg['max_tokens']} output tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _peer_points(ax, peers: dict | None, n: int) -> bool:
    """llama-server in the panel of its concurrency: its adapter row at k (markers) and its base-model row as a
    dashed line, medians of the rounds. True when it drew."""
    if not peers or peers["concurrency"] != n:
        return False
    from statistics import median

    for label, runs in peers["runs"]["adapters"].items():
        if label == "swapserve":
            continue
        line = ax.plot([peers["adapters"]], [median(r["tok_s"] for r in runs)], marker="s", linestyle="none",
                       label=f"{label}, {peers['adapters']} adapters")[0]
        base = peers["runs"]["base"].get(label)
        if base:
            level = median(r["tok_s"] for r in base)
            ax.axhline(level, color=line.get_color(), linestyle="--", linewidth=1, label=f"{label}, base model")
            ax.set_ylim(top=max(ax.get_ylim()[1], level * 1.08))  # a horizontal line does not widen the axis
    return True


def write_outputs(results: dict, cfg) -> dict[str, str]:
    """The JSON always; the chart and the markdown only from a clean tree (or with --allow-dirty, which the page
    then states at its top): numbers that belong to no commit are not published by accident."""
    path = save(results, cfg.out_dir, cfg.preset)
    written = {"json": str(path), "png": ""}
    if results["machine"].get("git_dirty") and not cfg.allow_dirty:
        import logging

        logging.getLogger("bench").error(
            "the tree has uncommitted changes: wrote %s only, not the chart or %s (commit first, or pass "
            "--allow-dirty to write them marked as such; `python -m bench.report %s` renders them later)",
            path, cfg.markdown or "the markdown", path)
        return written
    png = chart(results, path.with_suffix(".png"))
    written["png"] = str(png) if png else ""
    if cfg.markdown:
        from bench.markdown import render

        Path(cfg.markdown).write_text(render(results, path, png, Path(cfg.markdown)))
        written["markdown"] = cfg.markdown
    return written


def stamp(results: dict, command: str, started: float) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "command": command,
            "wall_seconds": round(time.time() - started, 1), "machine": machine(), **results}


def main(argv: list[str]) -> None:
    from bench.markdown import render

    path = Path(argv[0] if argv else "bench/results/default.json")
    results = json.loads(path.read_text())
    png = chart(results, path.with_suffix(".png"))
    out = Path(argv[1] if len(argv) > 1 else "BENCHMARKS.md")
    out.write_text(render(results, path, png, out))
    print(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
