"""The --api-keys-file parser, the key lookup and reload, and the per-tenant limits (with a fake clock): errors
name the line and entry and never quote a key; sliding windows, Retry-After and token settlement."""
from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest

from server.__main__ import main
from server.api.tenant_keys import KeyFileError, Tenant, key_digest, load_key_file
from server.api.tenant_limits import RateLimitedError, TenantLimits
from server.api.tenants import TenantKeys, authorize
from server.errors import InvalidRequestError, SwapserveError

SECRET = "sk-very-secret-key-0001"
GOOD = [{"key": SECRET, "name": "tenant-a", "adapters": ["tenant-a-*", "shared-*"], "rpm": 600},
        {"key": "sha256:" + hashlib.sha256(b"sk-other-key-0002").hexdigest(), "name": "tenant-b",
         "base_model": True, "tpm": 1000, "max_concurrent": 2}]


def write(path, entries_or_text) -> str:
    text = entries_or_text if isinstance(entries_or_text, str) else json.dumps(entries_or_text, indent=2)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # atomically, as SECURITY.md tells operators to
    return str(path)


def error_of(path, reserved=None) -> str:
    with pytest.raises(KeyFileError) as info:
        load_key_file(path, reserved)
    return str(info.value)


def test_a_good_file_in_json_and_yaml(tmp_path):
    yaml_text = ("- key: sk-very-secret-key-0001\n  name: tenant-a\n  adapters: [tenant-a-*, shared-*]\n  rpm: 600\n"
                 f"- key: {GOOD[1]['key']}\n  name: tenant-b\n  base_model: true\n  tpm: 1000\n  max_concurrent: 2\n")
    for path in (write(tmp_path / "keys.json", GOOD), write(tmp_path / "keys.yaml", yaml_text)):
        a, b = load_key_file(path)
        assert a == Tenant("tenant-a", key_digest(SECRET), ("tenant-a-*", "shared-*"), False, 600, None, None)
        assert b == Tenant("tenant-b", key_digest("sk-other-key-0002"), (), True, None, 1000, 2)


def test_globs_match_the_name_before_a_version():
    tenant = Tenant("t", b"", ("tenant-a-*", "shared-?"))
    assert tenant.may_use("tenant-a-x") and tenant.may_use("tenant-a-x@0123456789ab") and tenant.may_use("shared-1")
    assert not tenant.may_use("tenant-b") and not tenant.may_use("shared-12") and not tenant.may_use("x@tenant-a-1")
    with pytest.raises(SwapserveError) as denied:
        authorize(tenant, ["tenant-a-x", "other"], "base")
    assert denied.value.status_code == 403 and denied.value.error_type == "permission_error"
    assert "'other'" in denied.value.message and denied.value.param == "adapters"
    with pytest.raises(SwapserveError):
        authorize(tenant, [], "base")  # no base_model
    authorize(tenant, ["tenant-a-x@v1", "shared-2"], "base")
    authorize(None, [], "base")


@pytest.mark.parametrize("entries, where, problem", [
    ([{**GOOD[0], "rpn": 5}], "line 2 (entry 1, 'tenant-a')", "unknown field 'rpn'"),
    ([GOOD[1], {**GOOD[0], "rpm": 0}], "line 9 (entry 2, 'tenant-a')", "rpm must be a positive integer"),
    ([{**GOOD[0], "tpm": True}], "entry 1", "tpm must be a positive integer"),
    ([{**GOOD[0], "key": "sha256:abc"}], "entry 1", "64 hex digits"),
    ([{**GOOD[0], "key": ""}], "entry 1", "key must be a non-empty string"),
    ([{**GOOD[0], "key": "two words"}], "entry 1", "whitespace"),
    ([{**GOOD[0], "name": "bad name!"}], "entry 1)", "name must be letters"),
    ([{**GOOD[0], "adapters": "tenant-a-*"}], "entry 1", "adapters must be a list"),
    ([{**GOOD[0], "adapters": ["a@1"]}], "entry 1", "without '@'"),
    ([{"key": SECRET, "name": "nothing"}], "entry 1", "it reaches nothing"),
    ([{**GOOD[0], "base_model": "yes"}], "entry 1", "base_model must be true or false"),
    (["just a string"], "line 2 (entry 1)", "an entry must be a mapping"),
    ([GOOD[0], {**GOOD[1], "name": "tenant-a"}], "('tenant-a')", "the name is already used on line 2"),
    ([GOOD[0], {**GOOD[1], "key": SECRET}], "('tenant-b')", "the same key as line 2"),
    ([{**GOOD[0], SECRET: 1}], "entry 1", "unknown a field"),
    ({"keys": GOOD}, "line 1", "expected a list"),
])
def test_a_malformed_json_file_names_the_line_and_entry_and_never_the_key(tmp_path, entries, where, problem):
    message = error_of(write(tmp_path / "keys.json", entries))
    assert where in message and problem in message, message
    assert SECRET not in message and "sk-other-key" not in message


@pytest.mark.parametrize("suffix, text, where", [
    ("json", '[\n  {"key": "sk-very-secret-key-0001", "name": "a" "adapters": []}\n]', "line 2 column 50: invalid JSON"),
    ("json", '[{"key": "k", "name": "a", "key": "j", "base_model": true}]', "entry 1: field 'key' is given twice"),
    ("json", '[{"key": "k1", "name": "a", "base_model": true}] x', "line 1: text after the list"),
    ("yaml", "- key: sk-very-secret-key-0001\n  name: a\n  adapters: [x\n- key: k2\n", "line 4 column 6: invalid YAML"),
    ("yaml", "- key: sk-very-secret-key-0001\n  name: a\n  name: b\n  base_model: true\n", "line 3 (entry 1): field "
                                                                                           "'name' is given twice"),
    ("yaml", "key: sk-very-secret-key-0001\n", "line 1: expected a list"),
    ("yaml", "", "line 1: expected a list"),
    ("yaml", "- key: 12345\n  name: a\n  base_model: true\n", "line 1 (entry 1, 'a'): key must be a non-empty string"),
])
def test_syntax_errors_name_the_line_and_never_quote_it(tmp_path, suffix, text, where):
    message = error_of(write(tmp_path / f"keys.{suffix}", text))
    assert where in message and SECRET not in message, message


def test_other_suffixes_and_missing_files_are_refused(tmp_path):
    assert "must end in .json, .yaml or .yml" in error_of(write(tmp_path / "keys.txt", GOOD))
    assert "cannot read it" in error_of(tmp_path / "absent.json")


def test_a_tenant_key_may_not_be_the_api_or_admin_key(tmp_path):
    path = write(tmp_path / "keys.json", GOOD)
    message = error_of(path, {"--api-key": None, "--admin-key": SECRET})
    assert "line 2 ('tenant-a'): the key is the --admin-key" in message and SECRET not in message
    assert "the key is the --api-key" in error_of(path, {"--api-key": "sk-other-key-0002"})


def test_the_cli_refuses_to_start_on_a_malformed_file_naming_the_fault(tmp_path, capsys):
    path = write(tmp_path / "keys.json", [GOOD[0], {**GOOD[1], "max_concurent": 3}])
    with pytest.raises(SystemExit) as info:
        main(["serve", "--api-keys-file", path, "--model", str(tmp_path / "never-loaded")])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"--api-keys-file {path}: line 11 (entry 2, 'tenant-b'): unknown field 'max_concurent'" in err
    assert SECRET not in err


def test_lookup_is_by_key_and_sha256_and_reload_keeps_old_keys_on_error(tmp_path, caplog):
    path = write(tmp_path / "keys.json", GOOD)
    keys = TenantKeys(path)
    assert keys.lookup(SECRET).name == "tenant-a" and keys.lookup("sk-other-key-0002").name == "tenant-b"
    assert keys.lookup("sha256:" + hashlib.sha256(b"sk-other-key-0002").hexdigest()) is None  # the digest is no key
    assert keys.lookup("sk-wrong") is None and keys.lookup(None) is None

    write(path, [GOOD[0], {**GOOD[1], "key": "sk-rotated-0003"}, {"key": "sk-new-0004", "name": "c", "adapters": ["c-*"]}])
    assert keys.lookup("sk-new-0004").name == "c" and keys.lookup("sk-rotated-0003").name == "tenant-b"
    assert keys.lookup("sk-other-key-0002") is None

    with caplog.at_level(logging.DEBUG):
        write(path, '[{"key": "sk-broken-0005", "name": "d", "base_model": tru}]')
        assert keys.lookup("sk-new-0004").name == "c" and keys.lookup("sk-broken-0005") is None
        assert keys.lookup(SECRET).name == "tenant-a"  # the failure is logged once, not per request
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "line 1 column 55: invalid JSON" in errors[0] and "keeping the 3 keys" in errors[0]
    assert "sk-" not in caplog.text

    os.remove(path)
    assert keys.lookup("sk-new-0004").name == "c"  # a file gone keeps the keys too
    write(path, GOOD)
    assert keys.lookup("sk-new-0004") is None and keys.lookup(SECRET).name == "tenant-a"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(limits: TenantLimits, tenant: Tenant, tokens: int = 0) -> RateLimitedError:
    with pytest.raises(RateLimitedError) as info:
        limits.admit(tenant, tokens)
    return info.value


def test_rpm_is_a_sliding_minute_with_retry_after_until_the_oldest_leaves():
    clock, tenant = Clock(), Tenant("t", b"", base_model=True, rpm=2)
    limits = TenantLimits(clock=clock)
    limits.admit(tenant, 0).finish(0, 0)
    clock.now += 20
    limits.admit(tenant, 0).finish(0, 0)
    clock.now += 10
    assert refused(limits, tenant).retry_after == 30  # the first leaves the window 60 s after it came
    clock.now += 30
    limits.admit(tenant, 0)
    assert refused(limits, tenant).retry_after == 20


def test_tpm_reserves_prompt_plus_max_tokens_then_charges_what_was_used():
    clock, tenant = Clock(), Tenant("t", b"", base_model=True, tpm=100)
    limits = TenantLimits(clock=clock)
    first = limits.admit(tenant, 70)
    assert refused(limits, tenant, 40).retry_after == 60  # 70 reserved and in flight: 110 > 100
    first.finish(20, 10)  # used 30 of its 70
    clock.now += 15
    second = limits.admit(tenant, 40)
    second.finish(30, 10)
    clock.now += 5
    assert refused(limits, tenant, 50).retry_after == 40  # 70 used; the first's 30 leave at +60
    second_refusal = refused(limits, tenant, 100)
    assert second_refusal.retry_after == 55  # both must leave: the second's 40 at +75
    limits.admit(tenant, 30).cancel()  # refused later by the engine: charged nothing
    limits.admit(tenant, 30)
    with pytest.raises(InvalidRequestError):
        limits.admit(tenant, 101)  # could never fit: 400, not 429


def test_max_concurrent_counts_requests_in_flight_and_frees_on_finish_or_cancel():
    tenant = Tenant("t", b"", base_model=True, max_concurrent=2)
    limits = TenantLimits(clock=Clock())
    a, b = limits.admit(tenant, 0), limits.admit(tenant, 0)
    assert refused(limits, tenant).retry_after == 1
    a.finish(1, 1)
    a.finish(1, 1)  # settling twice frees once
    c = limits.admit(tenant, 0)
    assert limits.in_flight("t") == 2
    b.cancel()
    c.finish(0, 0)
    assert limits.in_flight("t") == 0


@pytest.mark.parametrize("doc, fence, suffix", [("README.md", "```yaml", ".yaml"), ("SECURITY.md", "```json", ".json")])
def test_the_documented_example_files_load(tmp_path, doc, fence, suffix):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / doc).read_text()
    section = text[text.index("## Tenant keys"):]
    example = section[section.index(fence) + len(fence):section.index("```", section.index(fence) + 3)]
    a, b = load_key_file(write(tmp_path / f"keys{suffix}", example))
    assert (a.name, a.adapters, a.rpm, a.tpm, a.max_concurrent) == ("tenant-a", ("tenant-a-*", "shared-*"), 600,
                                                                     200000, 8)
    assert b.name == "tenant-b" and b.base_model and b.digest == key_digest("sk-tenant-b")
