"""Scale and adapter types.

scale      ``scale_adapters`` LoRA adapters on disk under an --adapter-root (never pre-loaded), a swapserve
           engine with ``max_cpu_loras=scale_cpu_loras`` host entries and ``max_loras=scale_loras`` device
           slots, ``scale_requests`` concurrent requests whose adapters are drawn Zipf(s) over all of them and
           loaded on demand. Round 1 starts from empty tiers; later rounds draw again on the tiers round 1 left.
           Anchor: HF ``generate`` on the base model, same batch. Counted per round: host-tier hits and misses
           (AdapterStore's ``hit``/``miss`` events, one per request at admission), device loads
           (``runner.manager.loads``), host loads (the store's ``load`` events).
types      an IA3 cell and a mixed cell (LoRA + DoRA + IA3 + AdaLoRA, round-robin) at one concurrency, in the
           main engine, once per grid round, vs that round's HF base with the same batch. PEFT's ``adapter_names`` mixed batch only mixes LoRA
           adapters, so PEFT has no row here.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench import server_api
from bench.drivers import BenchRequest, EngineDriver, cell_requests, run_concurrent
from bench.timing import summarize

log = logging.getLogger("bench")


class AdapterEvents:
    """An engine observer counting the store's adapter events (hit, miss, load, evict_host)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def on_adapter_event(self, kind: str, name: str, seconds) -> None:
        self.counts[kind] += 1


def zipf_draw(names: list[str], count: int, s: float, seed: int) -> list[str]:
    """``count`` names drawn with P(rank i) proportional to 1 / i**s (names[0] is rank 1)."""
    p = 1.0 / np.arange(1, len(names) + 1) ** s
    rng = np.random.default_rng(seed)
    return [names[i] for i in rng.choice(len(names), size=count, p=p / p.sum())]


def scale_engine_config(cfg, model_dir: Path, root: Path):
    from server.config import EngineConfig

    return EngineConfig(model=str(model_dir), dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization,
                        threads=torch.get_num_threads(), max_loras=cfg.scale_loras,
                        max_cpu_loras=cfg.scale_cpu_loras, max_lora_rank=cfg.scale_rank,
                        max_num_seqs=cfg.scale_requests, max_model_len=cfg.prompt_tokens + max(cfg.max_tokens, 32) + 8,
                        max_num_batched_tokens=max(2048, cfg.scale_requests * cfg.prompt_tokens),
                        adapter_roots=[str(root)], max_waiting=max(256, 2 * cfg.scale_requests), seed=cfg.seed)


async def run_scale(cfg, model_dir: Path, root: Path, names: list[str], source, anchors) -> dict:
    """``source``: a PromptSource; every round draws fresh prompts (no prefix hits from an earlier round)."""
    from server.engine.async_engine import AsyncEngine

    engine = AsyncEngine(scale_engine_config(cfg, model_dir, root))
    events = AdapterEvents()
    engine.add_observer(events)
    await engine.start()
    await server_api.kv_resident(engine)
    driver = EngineDriver(engine)
    manager = engine.engine.runner.manager
    rounds = []
    try:
        for r in range(cfg.scale_rounds):
            draw = zipf_draw(names, cfg.scale_requests, cfg.zipf_s, cfg.seed + r)
            before, loads = Counter(events.counts), manager.loads
            prompts = source.take(cfg.scale_requests)
            reqs = [BenchRequest(p, a, cfg.max_tokens) for p, a in zip(prompts, draw)]
            summary = summarize(await run_concurrent(driver, reqs))
            d = events.counts - before
            row = {"round": r + 1, "swapserve": summary, "distinct_adapters": len(set(draw)),
                   "host_hits": d["hit"], "host_misses": d["miss"],
                   "host_hit_rate": d["hit"] / max(1, d["hit"] + d["miss"]), "host_loads": d["load"],
                   "host_evictions": d["evict_host"], "device_loads": manager.loads - loads,
                   "top_adapter_share": Counter(draw).most_common(1)[0][1] / len(draw)}
            if anchors:
                row.update(anchors.base_summaries(prompts, cfg.max_tokens))
            log.info("scale round %d: %d distinct adapters, swapserve %.1f tok/s%s, host hit rate %.2f, "
                     "device loads %d", r + 1, row["distinct_adapters"], summary["tok_s"], _anchors_said(row),
                     row["host_hit_rate"], row["device_loads"])
            rounds.append(row)
        entry = next(e for e in engine.engine.store.entries.values() if e.info.get("size_bytes"))
        tiers = {"disk_bytes": (Path(entry.source) / "adapter_model.safetensors").stat().st_size,
                 "host_bytes": entry.info["size_bytes"], "device_slot_bytes": engine.engine.runner.slot_bytes
                 // cfg.scale_loras, "device_total_bytes": engine.engine.runner.slot_bytes,
                 "max_loras": cfg.scale_loras, "rank": entry.info["rank"]}
    finally:
        await engine.shutdown(5)
    return {"adapters": len(names), "requests": cfg.scale_requests, "zipf_s": cfg.zipf_s,
            "max_cpu_loras": cfg.scale_cpu_loras, "max_loras": cfg.scale_loras, "rank": cfg.scale_rank,
            "rounds": rounds, "tiers": tiers}


def _anchors_said(row: dict) -> str:
    """" (HF base, oneDNN 150.1) (HF base 113.8)" for a log line: the row's base-model anchors."""
    return "".join(f" ({label} {row[key]['tok_s']:.1f})" for key, label in
                   (("base_onednn", "HF base, oneDNN"), ("base", "HF base")) if key in row)


class TypesCells:
    """The IA3 cell and the mixed cell in the grid's engine. ``lora``: LoRA cell adapters already loaded there.
    load() once, then run() once per grid round (bench/suite.py), each run beside that round's HF anchors for
    the same N (``base``: the same work whatever the prompts' ids), so each ratio pairs runs of one round;
    ``rows``: each cell's rows, one per round."""

    def __init__(self, cfg, engine, typed: dict[str, Path], kinds: dict[str, str], lora: list[str]) -> None:
        self.engine, self.typed, self.kinds, self.lora = engine, typed, kinds, lora
        self.driver = EngineDriver(engine)
        self.n, self.max_tokens, k = cfg.types_concurrency, cfg.max_tokens, cfg.types_adapters
        by_kind = {kind: [a for a, t in kinds.items() if t == kind] for kind in ("ia3", "dora", "adalora")}
        by_kind["lora"] = lora
        per = max(1, k // 4)
        mixed = [by_kind[kind][i] for i in range(per) for kind in ("lora", "dora", "ia3", "adalora")]
        self.cells = {"ia3": by_kind["ia3"][:k], "mixed": mixed}
        self.rows: dict[str, list[dict]] = {label: [] for label in self.cells}

    async def load(self, prompts) -> None:
        for name, path in self.typed.items():
            await self.driver.load_adapter(name, str(path))
        await run_concurrent(self.driver, cell_requests(prompts.take(len(self.typed)), list(self.typed), 2))

    async def run(self, prompts, base: dict) -> None:
        """Each cell once; ``base``: this round's HF anchors ("base", "base_onednn") at this N."""
        for label, adapters in self.cells.items():
            row: dict = {"cell": label, "concurrency": self.n, "adapters": len(adapters),
                         "kinds": dict(Counter(self.kinds.get(a, "lora") for a in adapters)), **base}
            row["swapserve"] = summarize(await run_concurrent(self.driver, cell_requests(
                prompts.take(self.n), adapters, self.max_tokens)))
            log.info("types cell %s N=%d k=%d, round %d: swapserve %.1f tok/s%s", label, self.n, len(adapters),
                     len(self.rows[label]) + 1, row["swapserve"]["tok_s"], _anchors_said(row))
            self.rows[label].append(row)

    def host_bytes(self) -> dict:
        """Host-tier bytes of one adapter of each type (the first LoRA cell adapter and each typed one)."""
        host = {}
        for name in [self.lora[0], *self.typed]:
            info = self.engine.engine.store.entries[name].info
            host.setdefault(info.get("type") or self.kinds.get(name, "lora"), info.get("size_bytes"))
        return host

