"""The --api-keys-file: a list of tenants, each a key scoped to adapter-name globs, with its own limits.

    - key: "sk-tenant-a-..."                  # or "sha256:<64 hex digits>", the SHA-256 of the key a client sends
      name: tenant-a                          # metrics label and request-log name; [A-Za-z0-9][A-Za-z0-9._-]{0,63}
      adapters: ["tenant-a-*", "shared-*"]    # fnmatch globs over adapter names (the part before any '@version')
      base_model: false                       # may it use the base model on its own (default false)
      rpm: 600                                # requests per sliding minute (absent or null: no limit)
      tpm: 200000                             # prompt + completion tokens per sliding minute
      max_concurrent: 8                       # requests in flight at once

JSON (.json) or YAML (.yaml, .yml). Every error names the line and the entry at fault, and never quotes a key:
an error message may be logged (a bad reload is logged, and the old keys kept). Unknown fields are errors, so a
misspelt limit (`rpn`) never leaves a tenant unlimited. Keys are kept only as SHA-256 digests.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from difflib import get_close_matches
from fnmatch import fnmatchcase
from pathlib import Path

import yaml

TENANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HEX_DIGEST_RE = re.compile(r"^[0-9a-fA-F]{64}\Z")
FIELD_RE = re.compile(r"^[a-z_]{1,24}\Z")
FIELDS = ("key", "name", "adapters", "base_model", "rpm", "tpm", "max_concurrent")
MAX_GLOBS = 256
MAX_GLOB_CHARS = 256


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file, the line and the entry, never a key."""


@dataclass(frozen=True)
class Tenant:
    """One entry of the key file. `digest`: SHA-256 of the key (a plain key is hashed on load)."""

    name: str
    digest: bytes
    adapters: tuple[str, ...] = ()
    base_model: bool = False
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def may_use(self, adapter: str) -> bool:
        """Whether an adapter reference (`name` or `name@version`) matches one of the tenant's globs."""
        name = adapter.split("@", 1)[0]
        return any(fnmatchcase(name, glob) for glob in self.adapters)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_key_file(path: str | Path, reserved: dict[str, str | None] | None = None) -> list[Tenant]:
    """The tenants of ``path``; KeyFileError naming the line and entry at fault. ``reserved``: {flag: key} of
    keys no tenant may hold (--api-key, --admin-key: a tenant key is never unrestricted, never admin)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"--api-keys-file {path}: cannot read it ({type(exc).__name__}: "
                           f"{getattr(exc, 'strerror', None) or 'not UTF-8'})") from None
    entries = _entries(path, text)
    tenants = [_tenant(path, line, i, entry) for i, (line, entry) in enumerate(entries, 1)]
    _check_unique(path, entries, tenants, reserved or {})
    return tenants


def _entries(path: Path, text: str) -> list[tuple[int, object]]:
    """(line, raw entry) for each entry of the top-level list."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _json_entries(path, text)
    if suffix in (".yaml", ".yml"):
        return _yaml_entries(path, text)
    raise KeyFileError(f"--api-keys-file {path}: the name must end in .json, .yaml or .yml (it says the format)")


def _json_entries(path: Path, text: str) -> list[tuple[int, object]]:
    """Entries of a JSON array, each with the line it starts on (raw_decode one element at a time)."""
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicate_fields)
    entries, pos = [], _skip(text, 0)
    try:
        if text[pos:pos + 1] != "[":
            raise KeyFileError(f"--api-keys-file {path}: line {_line(text, pos)}: expected a list of entries "
                               "([{...}, ...])")
        pos = _skip(text, pos + 1)
        while text[pos:pos + 1] != "]":
            if entries:
                if text[pos:pos + 1] != ",":
                    raise KeyFileError(f"--api-keys-file {path}: line {_line(text, pos)}: expected ',' or ']' "
                                       f"after entry {len(entries)}")
                pos = _skip(text, pos + 1)
            value, end = decoder.raw_decode(text, pos)
            entries.append((_line(text, pos), value))
            pos = _skip(text, end)
        if _skip(text, pos + 1) != len(text):
            raise KeyFileError(f"--api-keys-file {path}: line {_line(text, pos + 1)}: text after the list")
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"--api-keys-file {path}: line {exc.lineno} column {exc.colno}: invalid JSON "
                           f"({exc.msg})") from None
    except _DuplicateField as exc:
        raise KeyFileError(f"--api-keys-file {path}: entry {len(entries) + 1}: {exc}") from None
    return entries


class _DuplicateField(ValueError):
    pass


def _no_duplicate_fields(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for field, _ in pairs:
        if field in seen:
            raise _DuplicateField(f"{_field(field)} is given twice")
        seen.add(field)
    return dict(pairs)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _yaml_entries(path: Path, text: str) -> list[tuple[int, object]]:
    """Entries of a YAML sequence with their lines. Errors name the line and column only: PyYAML's own messages
    quote the offending line, which may hold a key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is None or not isinstance(root, yaml.SequenceNode):
            line = 1 if root is None else root.start_mark.line + 1
            raise KeyFileError(f"--api-keys-file {path}: line {line}: expected a list of entries (- key: ...)")
        for i, node in enumerate(root.value, 1):
            if isinstance(node, yaml.MappingNode):
                _check_yaml_fields(path, i, node)
        values = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        raise KeyFileError(f"--api-keys-file {path}: {where}invalid YAML ({exc.problem or exc.context})") from None
    except yaml.YAMLError as exc:
        raise KeyFileError(f"--api-keys-file {path}: invalid YAML ({type(exc).__name__})") from None
    return [(node.start_mark.line + 1, value) for node, value in zip(root.value, values)]


def _check_yaml_fields(path: Path, index: int, node: yaml.MappingNode) -> None:
    seen = set()
    for key_node, _ in node.value:
        field = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if field in seen:
            raise KeyFileError(f"--api-keys-file {path}: line {key_node.start_mark.line + 1} (entry {index}): "
                               f"{_field(field)} is given twice")
        seen.add(field)


def _field(field: object) -> str:
    """How an error names a field: by name when it is one of ours or a near miss of one (`rpn`), else not at all,
    since a stray string in the field position may be a key pasted in the wrong place."""
    if isinstance(field, str) and FIELD_RE.match(field) and (field in FIELDS or get_close_matches(field, FIELDS)):
        return f"field {field!r}"
    return "a field"


def _tenant(path: Path, line: int, index: int, entry: object) -> Tenant:
    where = f"--api-keys-file {path}: line {line} (entry {index}"

    def fail(problem: str) -> KeyFileError:
        name = entry.get("name") if isinstance(entry, dict) else None
        named = f", {name!r}" if isinstance(name, str) and TENANT_NAME_RE.match(name) else ""
        return KeyFileError(f"{where}{named}): {problem}")

    if not isinstance(entry, dict):
        raise fail("an entry must be a mapping with at least key and name")
    unknown = [f for f in entry if f not in FIELDS]
    if unknown:
        raise fail(f"unknown {_field(unknown[0])}; the fields are {', '.join(FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not TENANT_NAME_RE.match(name):
        raise fail("name must be letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)")
    tenant = Tenant(name=name, digest=_digest(entry.get("key"), fail), adapters=_globs(entry.get("adapters"), fail),
                    base_model=_flag(entry.get("base_model", False), fail),
                    **{f: _limit(entry.get(f), f, fail) for f in ("rpm", "tpm", "max_concurrent")})
    if not tenant.adapters and not tenant.base_model:
        raise fail("it reaches nothing: give adapters globs, or base_model: true")
    return tenant


def _digest(key: object, fail) -> bytes:
    if not isinstance(key, str) or not key:
        raise fail("key must be a non-empty string (the key, or sha256:<64 hex digits>)")
    if key.startswith("sha256:"):
        if not HEX_DIGEST_RE.match(key[len("sha256:"):]):
            raise fail("a sha256: key must be followed by 64 hex digits (the SHA-256 of the key clients send)")
        return bytes.fromhex(key[len("sha256:"):])
    if key != key.strip() or any(c.isspace() for c in key):
        raise fail("key must not contain whitespace (a bearer token never does, so it could never match)")
    return key_digest(key)


def _globs(value: object, fail) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_GLOBS:
        raise fail(f"adapters must be a list of at most {MAX_GLOBS} name globs, e.g. [\"tenant-a-*\"]")
    for glob in value:
        if not isinstance(glob, str) or not 0 < len(glob) <= MAX_GLOB_CHARS or "@" in glob:
            raise fail(f"adapters: each glob is a non-empty string of at most {MAX_GLOB_CHARS} characters over "
                       f"adapter names, without '@' (versions of an allowed name are allowed); got {glob!r}")
    return tuple(value)


def _flag(value: object, fail) -> bool:
    if not isinstance(value, bool):
        raise fail("base_model must be true or false")
    return value


def _limit(value: object, field: str, fail) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"{field} must be a positive integer, or null for no limit")
    return value


def _check_unique(path: Path, entries: list[tuple[int, object]], tenants: list[Tenant],
                  reserved: dict[str, str | None]) -> None:
    names, digests = {}, {}
    reserved_digests = {key_digest(key): flag for flag, key in reserved.items() if key}
    for (line, _), tenant in zip(entries, tenants):
        where = f"--api-keys-file {path}: line {line} ({tenant.name!r})"
        if tenant.name in names:
            raise KeyFileError(f"{where}: the name is already used on line {names[tenant.name]}; names are unique "
                               "(they label metrics and limits)")
        if tenant.digest in digests:
            raise KeyFileError(f"{where}: the same key as line {digests[tenant.digest]}; every tenant needs its "
                               "own key")
        if tenant.digest in reserved_digests:
            raise KeyFileError(f"{where}: the key is the {reserved_digests[tenant.digest]}; tenant keys must "
                               "differ from --api-key and --admin-key")
        names[tenant.name], digests[tenant.digest] = line, line
