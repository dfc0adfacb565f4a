"""Engine fixtures: an adapter root with every kind, the PEFT oracle, shared and fresh LLMEngines, an AsyncEngine
on its own loop, and observers that are removed after each test."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from server.engine.engine import LLMEngine
from .helpers import Hold, KINDS, Oracle, config, start


@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory) -> Path:
    """An adapter root holding every kind (name == directory name), plus 'cold' (a copy of rslora that only the
    single-flight test requests)."""
    out = tmp_path_factory.mktemp("engine-root")
    for kind in KINDS:
        shutil.copytree(adapters[kind], out / kind)
    shutil.copytree(adapters["rslora"], out / "cold")
    return out


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, root) -> Oracle:
    return Oracle(tiny_model_dir, root)


@pytest.fixture(scope="module")
def llm(tiny_model_dir, root):
    """Shared LLMEngine for tests that only need a correct engine; each leaves it idle."""
    eng = LLMEngine(config(tiny_model_dir, root))
    yield eng
    eng.store.close()


@pytest.fixture
def fresh_llm(tiny_model_dir, root):
    """A new LLMEngine per call, for tests that walk slot/LRU state from empty."""
    made = []

    def make(**overrides) -> LLMEngine:
        made.append(LLMEngine(config(tiny_model_dir, root, **overrides)))
        return made[-1]

    yield make
    for eng in made:
        eng.store.close()


@pytest.fixture(scope="module")
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture(scope="module")
def aengine(loop, tiny_model_dir, root):
    eng = start(loop, config(tiny_model_dir, root, max_loras=2, max_num_seqs=4))
    yield eng
    loop.run_until_complete(eng.shutdown(5))


@pytest.fixture
def observe(aengine):
    added = []

    def add(obs, eng=None):
        eng = eng or aengine
        eng.add_observer(obs)
        added.append((eng, obs))
        return obs

    yield add
    for eng, obs in added:
        if isinstance(obs, Hold):
            obs.go.set()
        eng.observers.remove(obs)
