"""server.adapters.disk_listing: adapters on disk under the roots, described from their configs; nothing outside the
roots is read, registered names and later roots' duplicates are skipped, a bad config is listed with why."""
from __future__ import annotations

import json
import os
import shutil

from server.adapters.disk_listing import disk_adapters, target_names


def test_lists_each_kind_from_its_config(adapters, tmp_path):
    root = tmp_path / "root"
    for name, kind in (("plain", "lora"), ("weighted", "dora"), ("scaled", "ia3"), ("ada", "adalora")):
        shutil.copytree(adapters[kind], root / name)
    rows = {a["name"]: a for a in disk_adapters([root.resolve()], set())}
    assert {n: (a["type"], a["rank"]) for n, a in rows.items()} == {
        "plain": ("lora", 8), "weighted": ("dora", 4), "scaled": ("ia3", None), "ada": ("adalora", 6)}
    assert rows["weighted"]["target_modules"] == ["gate_proj", "q_proj", "v_proj"]
    assert rows["plain"]["size_bytes"] == (root / "plain" / "adapter_model.safetensors").stat().st_size
    assert all(a["tier"] == "disk" and a["registered"] is False and "error" not in a for a in rows.values())


def test_skips_registered_names_later_duplicates_and_non_adapters(adapters, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for root in (first, second):
        shutil.copytree(adapters["lora"], root / "shared")
    shutil.copytree(adapters["lora"], second / "loaded")
    (first / "notes").mkdir()  # no adapter_config.json
    (first / "..hidden").mkdir()  # not a valid adapter name
    rows = disk_adapters([first.resolve(), second.resolve()], {"loaded"})
    assert [a["name"] for a in rows] == ["shared"]
    assert len(disk_adapters([second.resolve()], set(), limit=1)) == 1


def test_bad_configs_and_links_out_of_the_roots_are_listed_with_why(adapters, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(adapters["lora"], outside)
    (root / "garbled").mkdir(parents=True)
    (root / "garbled" / "adapter_config.json").write_text("{not json")
    (root / "prompt").mkdir()
    (root / "prompt" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    (root / "escape").mkdir()
    os.symlink(outside / "adapter_config.json", root / "escape" / "adapter_config.json")
    rows = {a["name"]: a for a in disk_adapters([root.resolve()], set())}
    assert "not valid JSON" in rows["garbled"]["error"] and rows["garbled"]["type"] is None
    assert "PROMPT_TUNING" in rows["prompt"]["error"]
    assert rows["escape"]["type"] is None and "outside" in rows["escape"]["error"].lower()


def test_target_names_are_the_configured_module_names():
    assert target_names(["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"]) == \
        ["q_proj", "v_proj"]
