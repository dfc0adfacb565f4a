"""Version rules (server/adapters/versions.py): the version is the content's SHA-256 prefix, name@version parsing,
split checking, and the canary routing function (weights kept over many users, sticky per user)."""
from __future__ import annotations

import hashlib
import json
import random
import struct
from collections import Counter

import pytest

from server.adapters.formats import load_adapter_dir
from server.adapters.versions import check_split, pick_version, split_pin, version_of
from server.errors import InvalidRequestError


def expected_version(directory) -> str:
    """The issue's definition, computed here from the files: SHA-256 over the config as canonical JSON, then the
    weights (the safetensors header as canonical JSON and the tensor bytes); its first 12 hex digits."""
    config = json.loads((directory / "adapter_config.json").read_text())
    raw = (directory / "adapter_model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    digest.update(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    digest.update(raw[8 + length:])
    return digest.hexdigest()[:12]


def test_version_is_the_content_hash_of_config_and_weights(adapters, tmp_path):
    for kind in ("lora", "lora2", "dora"):
        weights = load_adapter_dir(adapters[kind], kind)
        assert version_of(weights.content_hash) == expected_version(adapters[kind])
    assert version_of(load_adapter_dir(adapters["lora"], "x").content_hash) != \
        version_of(load_adapter_dir(adapters["lora2"], "x").content_hash)
    # the same files under another name and another directory: the same version
    (tmp_path / "copy").mkdir()
    for f in adapters["lora"].iterdir():
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    assert load_adapter_dir(tmp_path / "copy", "other").content_hash == \
        load_adapter_dir(adapters["lora"], "lora").content_hash
    # a config change alone (here its alpha) is another version: it computes something else
    config = json.loads((tmp_path / "copy" / "adapter_config.json").read_text())
    config["lora_alpha"] = config["lora_alpha"] * 2
    (tmp_path / "copy" / "adapter_config.json").write_text(json.dumps(config))
    assert version_of(load_adapter_dir(tmp_path / "copy", "other").content_hash) == expected_version(tmp_path / "copy")
    assert expected_version(tmp_path / "copy") != expected_version(adapters["lora"])


@pytest.mark.parametrize("model, parsed", [
    ("alpha@0123456789ab", ("alpha", "0123456789ab")),
    ("alpha", ("alpha", None)),
    ("org/repo@main", ("org/repo@main", None)),  # a Hub revision, not a version
    ("alpha@0123456789AB", ("alpha@0123456789AB", None)),  # versions are lowercase hex
    ("alpha@0123456789a", ("alpha@0123456789a", None)),
    ("@0123456789ab", ("@0123456789ab", None)),
])
def test_split_pin(model, parsed):
    assert split_pin(model) == parsed


def test_canary_80_20_over_1000_users_is_within_4_points_and_sticky():
    split = check_split({"aaaaaaaaaaaa": 80, "bbbbbbbbbbbb": 20}, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "m")
    users = [f"user-{i}" for i in range(1000)]
    chosen = {u: pick_version(split, "m", u) for u in users}
    share = Counter(chosen.values())["aaaaaaaaaaaa"] / len(users) * 100
    assert 76 <= share <= 84, share
    for u in users[:200]:  # sticky: the same user lands on the same version every time
        assert pick_version(split, "m", u) == chosen[u]
    # another adapter name draws its own assignment (not the same users on every canary)
    other = {u: pick_version(split, "n", u) for u in users}
    assert other != chosen


def test_canary_without_a_user_is_drawn_per_request():
    split = {"aaaaaaaaaaaa": 50.0, "bbbbbbbbbbbb": 50.0}
    rng = random.Random(7)
    picks = Counter(pick_version(split, "m", None, rng) for _ in range(1000))
    assert 440 <= picks["aaaaaaaaaaaa"] <= 560, picks
    assert pick_version({"aaaaaaaaaaaa": 0.0, "bbbbbbbbbbbb": 100.0}, "m", "anyone") == "bbbbbbbbbbbb"


@pytest.mark.parametrize("split, message", [
    ({"aaaaaaaaaaaa": 90, "bbbbbbbbbbbb": 20}, "sum to 100, got 110"),
    ({"aaaaaaaaaaaa": 90}, "sum to 100, got 90"),
    ({"aaaaaaaaaaaa": 90, "cccccccccccc": 10}, "has no version 'cccccccccccc'"),
    ({"aaaaaaaaaaaa": 110, "bbbbbbbbbbbb": -10}, "must be a finite number >= 0"),
    ({"aaaaaaaaaaaa": "90", "bbbbbbbbbbbb": 10}, "must be a finite number >= 0"),
    ({"aaaaaaaaaaaa": True, "bbbbbbbbbbbb": 99}, "must be a finite number >= 0"),
    ({}, "one or more versions"),
])
def test_bad_splits_are_refused_with_400(split, message):
    with pytest.raises(InvalidRequestError, match=message) as caught:
        check_split(split, ["aaaaaaaaaaaa", "bbbbbbbbbbbb"], "m")
    assert caught.value.status_code == 400 and caught.value.param == "split"
