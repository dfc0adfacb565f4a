"""Adapters on disk under the adapter roots that the store has not registered: what the console lists beside
the registered ones, so people see what a request (or a load) could use before anything reads the weights.

Only each directory's adapter_config.json is read (through AdapterDir, so nothing outside the roots is opened,
capped at MAX_CONFIG_BYTES), and the weights file is stat'ed for its size; a config that would not load is
listed with the reason instead of a type. Directories are listed in name order, at most ``limit`` in all.
"""
from __future__ import annotations

import os
from pathlib import Path

from server.adapters.adapter_dir import AdapterDir
from server.adapters.formats import CONFIG_FILE, WEIGHTS_FILE, check_config, read_config
from server.config import valid_adapter_name
from server.errors import SwapserveError


def disk_adapters(roots: list[Path], skip: set[str], limit: int = 256) -> list[dict]:
    """One entry per adapter directory ``<root>/<name>/`` not in ``skip`` (the first root holding a name
    wins, as AdapterSources.on_demand resolves it): name, type, rank, target_modules, size_bytes, tier "disk"
    and, for a config that would not load, ``error``."""
    found: dict[str, dict] = {}
    for root in roots:
        try:
            names = sorted(os.listdir(root))
        except OSError:
            continue
        for name in names:
            if len(found) >= limit:
                return list(found.values())
            if name in skip or name in found or not valid_adapter_name(name):
                continue
            if (root / name / CONFIG_FILE).is_file():
                found[name] = {"name": name, "tier": "disk", "registered": False, **describe_dir(root / name, roots)}
    return list(found.values())


def describe_dir(directory: Path, roots: list[Path]) -> dict:
    """type, rank, target_modules and size_bytes from an adapter directory's config and weights file; None for
    what cannot be read, and ``error`` saying why the adapter would not load when its config says so."""
    out: dict = {"type": None, "rank": None, "target_modules": None, "size_bytes": None}
    try:
        with AdapterDir(directory, roots) as opened:
            config = read_config(opened)
            weights = opened.open(WEIGHTS_FILE)
            if weights is not None:
                with weights:
                    out["size_bytes"] = os.fstat(weights.fileno()).st_size
        peft_type = check_config(config, directory / CONFIG_FILE)
    except (SwapserveError, OSError) as e:
        return out | {"error": str(e)}
    out["type"] = "dora" if config.get("use_dora") else peft_type.lower()
    rank = {"LORA": config.get("r"), "ADALORA": config.get("init_r")}.get(peft_type)  # AdaLoRA's r is unused
    out["rank"] = rank if isinstance(rank, int) else None
    targets = config.get("target_modules")
    out["target_modules"] = target_names(targets) if isinstance(targets, list) else targets
    return out


def target_names(modules) -> list[str]:
    """Module paths (model.layers.0.self_attn.q_proj) as the names people configure (q_proj), once each."""
    return sorted({str(m).rsplit(".", 1)[-1] for m in modules})
