"""The traffic workloads on another commit's engine: ``git archive COMMIT server`` into a temporary directory,
then ``python -m bench.traffic --server-src DIR`` in a subprocess (cwd DIR, PYTHONPATH DIR:<this tree>), so
``import server`` finds that commit's package and ``bench`` is this tree's. Same model, adapters, sizes and
threads as the in-process run; the rates of (c) are the ones the in-process run measured, so both engines
see the same offered load."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench.traffic import TrafficSpec

log = logging.getLogger("bench")
REPO = Path(__file__).resolve().parents[1]


def short_commit(commit: str, repo: Path = REPO) -> str:
    """``commit`` resolved to its short hash; ValueError naming the commit when git does not know it."""
    done = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "--verify", f"{commit}^{{commit}}"],
                          capture_output=True, text=True)
    if done.returncode:
        raise ValueError(f"--traffic-baseline {commit!r}: not a commit of {repo} ({done.stderr.strip()})")
    return done.stdout.strip()


def extract_server(commit: str, dest: Path, repo: Path = REPO) -> Path:
    """``commit``'s server/ package under ``dest`` (returns dest/server)."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit, "server"],
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    return dest / "server"


async def run_checkout(src: Path, spec: TrafficSpec, out: Path) -> dict:
    """bench.traffic on the server package in ``src`` (a child process; its log goes to this one's stderr)."""
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(REPO)]), "HF_HUB_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.traffic", "--server-src", str(src),
                                                "--spec", str(spec_path), "--out", str(out), cwd=src, env=env)
    if await proc.wait():
        raise RuntimeError(f"the traffic run on {spec.label} failed (exit {proc.returncode}); its log is above")
    return json.loads(out.read_text())


async def run_baseline(commit: str, spec: TrafficSpec, rates: list[float]) -> dict:
    """The traffic run on ``commit``'s engine, at the (c) ``rates`` given."""
    short = short_commit(commit)
    with tempfile.TemporaryDirectory(prefix=f"swapserve-{short}-") as tmp:
        extract_server(short, Path(tmp))
        base = replace(spec, traffic={**spec.traffic, "rates": rates}, label=f"engine at {short}", commit=short)
        log.info("traffic baseline: %s's server/ in %s", short, tmp)
        return await run_checkout(Path(tmp), base, Path(tmp) / "result.json")
