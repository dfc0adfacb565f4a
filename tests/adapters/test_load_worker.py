"""server.adapters.load_worker: an adapter loaded in the helper process is the same, tensor for tensor, as one
loaded in-process; refusals keep their message and 400; a dead worker costs one load a clear error, and the
next load respawns it; no process at all falls back to in-process loading."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ADAPTER_KINDS

from server.adapters import load_worker
from server.adapters.formats import AdapterFormatError
from server.adapters.weights import AdapterWeights, ModuleWeights
from server.errors import AdapterError

MAX_RANK = 8


@pytest.fixture(scope="module")
def layout(tiny_model_dir):
    """(targets, banks) of the tiny model, as the runner computes them."""
    from transformers import AutoModelForCausalLM

    from server.adapters.manager import AdapterManager
    from server.layers.inject import target_shapes, wrap_model
    from server.layers.mapping import MappingHolder

    holder = MappingHolder()
    wrapped = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), holder, 2, MAX_RANK,
                         torch.float32, torch.device("cpu"))
    return target_shapes(wrapped), AdapterManager(wrapped, holder, 2, torch.device("cpu")).layout


@pytest.fixture
def worker():
    w = load_worker.LoadWorker()
    yield w
    w.close()


def job(directory, layout, name="x"):
    targets, banks = layout
    return dict(directory=str(directory), name=name, max_bytes=1 << 30, targets=targets, max_rank=MAX_RANK,
                base_model_name=None, banks=banks)


def tensors_of(w):
    out = {}
    for number, pb in w.packed.items():
        out.update({f"bank{number}.{k}": v for k, v in vars(pb).items()})
    for module, m in w.modules.items():
        out.update({f"{module}.{k}": v for k, v in vars(m).items()})
    return out


@pytest.mark.parametrize("kind", [*ADAPTER_KINDS, "lora2"])
def test_process_load_equals_in_process_load(kind, adapters, layout, worker):
    here = load_worker.prepare(**job(adapters[kind], layout, kind))
    there = worker.load(**job(adapters[kind], layout, kind))
    assert worker.proc is not None and worker.proc.pid != os.getpid()
    assert (there.name, there.kind, there.rank, there.path, there.config, there.nbytes) == \
        (here.name, here.kind, here.rank, here.path, here.config, here.nbytes)
    assert there.packed.keys() == here.packed.keys()
    if kind != "dora":
        assert there.packed, "nothing packed"
    a, b = tensors_of(here), tensors_of(there)
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(b[key], torch.Tensor) and value.dtype == b[key].dtype, key
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_refusal_keeps_message_and_status(adapters, layout, worker, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapters["lora"] / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(AdapterFormatError) as info:
        worker.load(**job(bad, layout))
    assert info.value.status_code == 400 and "adapter_model.safetensors" in str(info.value)
    targets, banks = layout
    with pytest.raises(AdapterFormatError, match="rank 8 > --max-lora-rank 4"):
        worker.load(**{**job(adapters["lora"], layout), "max_rank": 4})
    assert worker.load(**job(adapters["lora"], layout)).packed  # the worker is still fine


def test_dead_worker_fails_one_load_then_respawns(adapters, layout, worker):
    worker.load(**job(adapters["lora"], layout))
    first = worker.proc.pid
    worker.proc.kill()
    worker.proc.wait(5)
    worker.proc.poll = lambda: None  # as if it died mid-job, after the liveness check
    with pytest.raises(AdapterError, match="loader process died"):
        worker.load(**job(adapters["lora"], layout))
    again = worker.load(**job(adapters["ia3"], layout))
    assert worker.proc.pid != first and again.kind == "ia3"


def test_no_process_falls_back_in_process(adapters, layout, worker, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise OSError("no new processes here")
    monkeypatch.setattr(load_worker.subprocess, "Popen", refuse)
    w = worker.load(**job(adapters["lora"], layout))
    assert worker.disabled and worker.proc is None and w.packed
    assert "loading adapters in-process" in caplog.text


def test_stuck_worker_is_replaced(adapters, layout):
    """A worker that never answers costs one load a clear error after the timeout; the next load gets a new one."""
    worker = load_worker.LoadWorker(timeout=60)  # the first load includes the worker's start-up
    try:
        worker.load(**job(adapters["lora"], layout))
        stuck = worker.proc.pid
        os.kill(stuck, signal.SIGSTOP)  # alive but silent
        worker.timeout = 0.5
        with pytest.raises(AdapterError, match="took over 0 s"):
            worker.load(**job(adapters["lora"], layout))
        assert worker.proc is None
        worker.timeout = 60
        assert worker.load(**job(adapters["ia3"], layout)).kind == "ia3" and worker.proc.pid != stuck
    finally:
        worker.close()


def test_worker_never_runs_the_embedding_programs_main(adapters, layout, tmp_path):
    """A program that uses swapserve at module level, without a __main__ guard, still gets a loader process:
    the worker is a fresh interpreter (load_worker._BOOT), which never re-runs the caller's script
    (multiprocessing's spawn did, and the script's child then tried to start a worker of its own)."""
    marker = tmp_path / "runs"
    script = tmp_path / "unguarded.py"
    script.write_text(f"""
import json, os, sys
from pathlib import Path
with open({str(marker)!r}, "a") as f:
    f.write(str(os.getpid()) + "\\n")
from server.adapters import load_worker
job = json.loads(Path({str(tmp_path / "job.json")!r}).read_text())
w = load_worker.LoadWorker()
weights = w.load(**job)
print(json.dumps({{"pid": w.proc.pid, "packed": bool(weights.packed)}}))
w.close()
""")
    (tmp_path / "job.json").write_text(json.dumps(job(adapters["lora"], layout)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=Path(load_worker.__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["packed"] and len(marker.read_text().split()) == 1  # the script ran once: in its own process


def test_handoff_is_one_shared_mapping_and_leaks_no_descriptor(adapters, layout, worker):
    """The server gets the worker's packed tensors as views into one shared-memory mapping (no file written,
    nothing read back), and every descriptor passed over the socket is closed again."""
    worker.load(**job(adapters["lora"], layout))  # the worker is up
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        w = worker.load(**job(adapters["lora"], layout))
    assert len(os.listdir("/proc/self/fd")) == fds
    tensors = [t for pb in w.packed.values() for t in (pb.a, pb.b) if t is not None]
    tensors += [t for m in w.modules.values() for t in (m.a, m.slot_b) if t is not None]
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    assert len(storages) == 1, "every tensor views the one arena mapping"


def rss_shmem() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    return 0


def test_arena_grows_copies_in_what_lives_elsewhere_and_is_freed_with_its_last_view():
    """Allocations past the first chunk get a new one; tensors packed elsewhere (or non-contiguous) are copied
    in; rebuild maps every page in, and the memory goes when the adapter does."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 1 << 19, generator=gen)  # 16 MiB: past the 1 MiB first chunk
    ia3 = torch.randn(64, 3, generator=gen)[:, 1]  # non-contiguous, from outside the arena
    weights = AdapterWeights("x", "LORA", False, {"m": ModuleWeights(a=a, slot_b=torch.ones(8, 4)),
                                                  "n": ModuleWeights(ia3=ia3),  # a rank-0 AdaLoRA module:
                                                  "z": ModuleWeights(a=torch.zeros(0, 4), slot_b=torch.zeros(0, 3))},
                             "/nowhere")
    arena = load_worker.Arena(1 << 20)
    inside = arena.alloc((8, 4), torch.float32).copy_(weights.modules["m"].slot_b)
    weights.modules["m"].slot_b = inside
    meta = load_worker.describe(weights, arena)
    assert len(arena.chunks) > 1 and meta["size"] >= a.numel() * 4
    fd = os.dup(arena.fd)
    del weights, inside
    arena.close()  # as the worker does once the descriptor is sent: only the server's mapping is left
    before = rss_shmem()
    got = load_worker.rebuild(fd, meta)
    assert rss_shmem() - before >= a.numel() * 4, "rebuild maps every page in"
    assert torch.equal(got.modules["m"].a, a) and torch.equal(got.modules["m"].slot_b, torch.ones(8, 4))
    assert torch.equal(got.modules["n"].ia3, ia3)
    assert got.modules["z"].a.shape == (0, 4) and got.modules["z"].slot_b.shape == (0, 3)
    del got
    assert rss_shmem() - before < 1 << 20, "the mapping is freed with the adapter"


def test_a_server_package_in_the_working_directory_does_not_replace_the_worker(adapters, layout, worker,
                                                                                tmp_path, monkeypatch):
    """The worker imports this very package and the standard library: another `server` package, or a
    json.py, in the working directory (where `-m` and `-c` look first) is never run in their place."""
    fake = tmp_path / "server"
    (fake / "adapters").mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit('the wrong server package ran')\n")
    (tmp_path / "json.py").write_text("raise SystemExit('the wrong json ran')\n")
    monkeypatch.chdir(tmp_path)
    assert worker.load(**job(adapters["lora"], layout)).packed
