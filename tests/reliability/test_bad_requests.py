"""Bad requests over HTTP: every numeric field out of range, oversized lists and counts, out-of-vocabulary token
ids, prompts over --max-model-len, malformed JSON, 20 MB bodies and wrong types each get a 4xx with a message
naming the problem, and the server keeps serving. Then schemathesis fuzzes every route of the app's own OpenAPI
schema and no generated input may get a 5xx.
"""
from __future__ import annotations

import json
import shutil
import socket
import time

import httpx
import pytest

from api.conftest import MAX_MODEL_LEN, engine_config, live_server
from api.helpers import samples
from server.api.settings import MAX_N, MAX_PROMPTS_HARD, ServerConfig

from .conftest import BASE, NORMAL, error_message, still_serves

BIG = 1 << 20  # protocol.py's bound on token counts
I64 = 2**63 - 1
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TGI = {"inputs": "hello"}


@pytest.fixture(scope="module")
def root(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-requests-root")
    shutil.copytree(adapters["lora"], out / "alpha")
    return out


@pytest.fixture(scope="module")
def bad_server(tiny_model_dir, root):
    """Default body cap (4 MiB), max_model_len 512 (the tiny Llama's positions), one adapter under the root."""
    config = engine_config(tiny_model_dir, root, max_num_seqs=8)
    with live_server(config, ServerConfig(shutdown_timeout=2)) as live:
        yield live


@pytest.fixture(scope="module")
def http(bad_server):
    with bad_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def vocab(bad_server) -> int:
    return bad_server.engine.engine.runner.vocab_size


def refused(r, status: int, *needles: str) -> None:
    """`r` is `status` with the error shape of its route, and its message mentions every needle."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    message = error_message(r)
    if r.request.url.path.startswith("/generate"):
        assert set(r.json()) == {"error", "error_type"}
    else:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"} and r.json()["error"]["code"] == status
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --- every numeric field out of range ----------------------------------------------------------------------

SAMPLING_OUT_OF_RANGE = {  # fields shared by /v1/completions and /v1/chat/completions
    "max_tokens": [-1, BIG + 1, I64 + 1],  # 0 is valid: the prompt alone (echo, prompt_logprobs)
    "temperature": [-0.01, 2.01],
    "top_p": [0.0, -0.5, 1.01],
    "top_k": [-2, BIG + 1],
    "repetition_penalty": [0.0, -1.0, 10.01],
    "frequency_penalty": [-2.01, 2.01],
    "presence_penalty": [-2.01, 2.01],
    "seed": [I64 + 1, -I64 - 2],
    "n": [0, -1, MAX_N + 1, 10**9],
    "best_of": [0, MAX_N + 1],
    "min_tokens": [-1, BIG + 1],
    "stop_token_ids": [[-1], [2**31]],
}
COMPLETION_ONLY = {"logprobs": [-1, 21]}
CHAT_ONLY = {"max_completion_tokens": [-1, BIG + 1], "top_logprobs": [-1, 21]}
TGI_OUT_OF_RANGE = {
    "max_new_tokens": [0, BIG + 1], "temperature": [0.0, -1.0, 100.01], "top_p": [0.0, 1.0], "top_k": [0, -5],
    "repetition_penalty": [0.0, 10.01], "frequency_penalty": [-2.01, 2.01], "seed": [-1, I64 + 1],
    "truncate": [0, BIG + 1], "typical_p": [0.0, 1.0], "top_n_tokens": [-1, 6], "best_of": [0, 2],
}


def _cases():
    for field, values in {**SAMPLING_OUT_OF_RANGE, **COMPLETION_ONLY}.items():
        for v in values:
            yield pytest.param("/v1/completions", {**NORMAL, field: v}, field, id=f"completions-{field}={v}")
    for field, values in {**SAMPLING_OUT_OF_RANGE, **CHAT_ONLY}.items():
        for v in values:
            yield pytest.param("/v1/chat/completions", {**CHAT, field: v}, field, id=f"chat-{field}={v}")
    for field, values in TGI_OUT_OF_RANGE.items():
        for v in values:
            for path in ("/generate", "/generate_stream"):
                yield pytest.param(path, {**TGI, "parameters": {field: v}}, field, id=f"{path[1:]}-{field}={v}")


@pytest.mark.parametrize("path, body, field", list(_cases()))
def test_numeric_field_out_of_range(http, path, body, field):
    r = http.post(path, json=body)
    if path.startswith("/generate"):
        refused(r, 422, field)
    else:
        refused(r, 400, field)
        assert r.json()["error"]["param"] in (field, "0", "1")  # list items are named by their index
    still_serves(http)


@pytest.mark.parametrize("path, literal", [
    ("/v1/completions", "NaN"), ("/v1/completions", "Infinity"), ("/v1/completions", "-Infinity"),
    ("/v1/chat/completions", "NaN"), ("/generate", "NaN"),
])
def test_non_finite_floats(http, path, literal):
    """Python's json accepts NaN/Infinity literals; every float field must still refuse them."""
    for field in ("temperature", "top_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
        if path == "/generate":
            body = '{"inputs": "hi", "parameters": {"%s": %s}}' % ("temperature" if field == "presence_penalty"
                                                                 else field, literal)
        else:
            base = NORMAL if path == "/v1/completions" else CHAT
            body = json.dumps(base)[:-1] + f', "{field}": {literal}}}'
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500 and r.status_code in (400, 422), (field, r.status_code, r.text)
    still_serves(http)


# --- huge counts and lists -----------------------------------------------------------------------------------

HUGE = [
    ("/v1/completions", {**NORMAL, "max_tokens": BIG}, 400, "maximum context length is 512 tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": BIG}, 400, "maximum context length is 512 tokens"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": None, "max_completion_tokens": BIG}, 400,
     "maximum context length"),
    ("/generate", {**TGI, "parameters": {"max_new_tokens": BIG}}, 422, "maximum context length"),
    ("/v1/completions", {**NORMAL, "n": MAX_N, "prompt": ["a"] * 33}, 400, "<= 256 (--max-prompts)"),
    ("/v1/completions", {**NORMAL, "prompt": ["a"] * (MAX_PROMPTS_HARD + 1)}, 400, "prompt"),
    ("/v1/completions", {**NORMAL, "prompt": [[5]] * (MAX_PROMPTS_HARD + 1)}, 400, "prompt"),
    ("/v1/completions", {**NORMAL, "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/completions", {**NORMAL, "stop": ["x"] * 100_000}, 400, "stop"),
    ("/v1/completions", {**NORMAL, "stop": "x" * 513}, 400, "stop"),
    ("/v1/completions", {**NORMAL, "stop": ["x" * 513]}, 400, "stop"),
    ("/v1/completions", {**NORMAL, "stop_token_ids": [1] * 65}, 400, "stop_token_ids"),
    ("/v1/chat/completions", {**CHAT, "stop": ["x"] * 1000}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x"}] * 1025}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}]},
     400, "content"),
    ("/generate", {**TGI, "parameters": {"stop": ["x"] * 17}}, 422, "stop"),
    ("/generate_stream", {**TGI, "parameters": {"stop": ["x"] * 10_000}}, 422, "stop"),
    ("/v1/completions", {**NORMAL, "model": "m" * 257}, 400, "model"),
    ("/v1/completions", {**NORMAL, "user": "u" * 257}, 400, "user"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "p" * 5000}, 400, "lora_path"),
    ("/v1/adapters", {"name": "n" * 257, "source": "alpha"}, 400, "name"),
]


@pytest.mark.parametrize("path, body, status, needle", HUGE, ids=[f"{p[1:]}-{i}" for i, (p, *_) in enumerate(HUGE)])
def test_huge_counts_and_lists(http, path, body, status, needle):
    refused(http.post(path, json=body), status, needle)
    still_serves(http)


# --- token ids and prompt lengths --------------------------------------------------------------------------

def test_out_of_vocabulary_token_ids(http, vocab):
    for prompt in ([vocab], [1, 2, vocab + 1000], [[1, 2], [3, vocab]], [2**31 - 1]):
        refused(http.post("/v1/completions", json={**NORMAL, "prompt": prompt}), 400, "out of the vocabulary")
    for prompt in ([-1], [2**31], [[-5]], [], [[]], [1.5], [[1, "a"]]):
        refused(http.post("/v1/completions", json={**NORMAL, "prompt": prompt}), 400, "prompt")
    assert http.post("/v1/completions", json={**NORMAL, "prompt": [vocab - 1, 0]}).status_code == 200
    still_serves(http)


def test_prompts_over_max_model_len(bad_server, http):
    tok = bad_server.engine.tokenizer
    long_text = "hello " * 600
    assert len(tok.encode(long_text)) > MAX_MODEL_LEN
    cases = [
        ("/v1/completions", {**NORMAL, "prompt": long_text}, 400),
        ("/v1/completions", {**NORMAL, "prompt": [5] * (MAX_MODEL_LEN + 1)}, 400),
        ("/v1/completions", {**NORMAL, "prompt": [5] * MAX_MODEL_LEN, "max_tokens": 1}, 400),  # 512 + 1 > 512
        ("/v1/completions", {**NORMAL, "prompt": ["hi", long_text]}, 400),  # one long prompt in a batch
        ("/v1/completions", {**NORMAL, "prompt": "word " * 40_000}, 400),  # ~200 KB of text
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": long_text}]}, 400),
        ("/v1/chat/completions", {**CHAT, "max_tokens": None, "messages": [{"role": "user", "content": long_text}]},
         400),
        ("/generate", {"inputs": long_text, "parameters": {"max_new_tokens": 2}}, 422),
        ("/generate_stream", {"inputs": long_text, "parameters": {"max_new_tokens": 2}}, 422),
    ]
    for path, body, status in cases:
        refused(http.post(path, json=body), status, "maximum context length is 512 tokens")
    edge = http.post("/v1/completions", json={**NORMAL, "prompt": [5] * (MAX_MODEL_LEN - 1), "max_tokens": 1})
    assert edge.status_code == 200 and edge.json()["usage"]["total_tokens"] == MAX_MODEL_LEN
    truncated = http.post("/generate", json={"inputs": long_text, "parameters": {"max_new_tokens": 2,
                                                                                  "truncate": 100}})
    assert truncated.status_code == 200, truncated.text  # TGI's truncate keeps the last 100 tokens
    still_serves(http)


# --- malformed bodies and wrong types ----------------------------------------------------------------------

MALFORMED = [b"{not json", b'{"prompt": "x"', b"", b"null", b"[]", b'"a string"', b"123", b"true",
             b'{"prompt": "\xff\xfe"}', b"\xff\xfe\x00\x00", b"[" * 100_000, b'{"a":' * 50_000,
             b'{"prompt": "x"}{"prompt": "y"}', b"\x00" * 64]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream",
                                  "/v1/load_lora_adapter", "/v1/adapters", "/v1/unload_lora_adapter"])
def test_malformed_json(http, path):
    status = 422 if path.startswith("/generate") else 400
    for raw in MALFORMED:
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        refused(r, status)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = http.post(path, content=b'{"prompt": "x"}', headers={"content-type": content_type})
        assert 400 <= r.status_code < 500, (content_type, r.status_code, r.text)
    still_serves(http)


WRONG_TYPES = {
    "/v1/completions": [("prompt", 123), ("prompt", {"a": 1}), ("prompt", [1.5]), ("prompt", [["a"]]),
                        ("prompt", None), ("max_tokens", "ten"), ("max_tokens", []), ("max_tokens", 1.5),
                        ("temperature", "hot"), ("n", 1.5), ("n", "two"), ("stream", [1]), ("stream", "maybe"),
                        ("stop", 5), ("stop", [1, 2]), ("stop", {"a": 1}), ("logprobs", "many"), ("echo", {}),
                        ("model", 5), ("model", ["a"]), ("seed", 1.5), ("stream_options", "yes"),
                        ("stream_options", {"include_usage": "perhaps"}), ("stop_token_ids", "1,2")],
    "/v1/chat/completions": [("messages", "hi"), ("messages", [1]), ("messages", [{"role": 1, "content": "x"}]),
                             ("messages", [{"content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
                             ("messages", [{"role": "user", "content": [{"text": "no type"}]}]),
                             ("messages", None), ("logprobs", "yes please"), ("top_logprobs", "1.5x")],
    "/generate": [("inputs", 5), ("inputs", None), ("inputs", ""), ("parameters", []), ("parameters", None),
                  ("parameters", {"stop": "x"}), ("parameters", {"max_new_tokens": "many"}),
                  ("parameters", {"details": "verbose"}), ("stream", {})],
    "/v1/load_lora_adapter": [("lora_name", 5), ("lora_path", ["a"]), ("load_inplace", "sometimes")],
    "/v1/adapters": [("name", None), ("source", 7), ("pinned", "very")],
}


@pytest.mark.parametrize("path, field, value", [(p, f, v) for p, cases in WRONG_TYPES.items() for f, v in cases],
                         ids=[f"{p[1:]}-{f}={v!r}"[:60] for p, cases in WRONG_TYPES.items() for f, v in cases])
def test_wrong_types(http, path, field, value):
    base = {"/v1/completions": NORMAL, "/v1/chat/completions": CHAT, "/generate": TGI,
            "/v1/load_lora_adapter": {"lora_name": "x", "lora_path": "alpha"},
            "/v1/adapters": {"name": "x", "source": "alpha"}}[path]
    refused(http.post(path, json={**base, field: value}), 422 if path == "/generate" else 400, field)
    assert "x" not in {a["name"] for a in http.get("/v1/adapters").json()["data"]}
    still_serves(http)


# --- oversized bodies ----------------------------------------------------------------------------------------

TWENTY_MB = 20 * 1000 * 1000


def _raw_post(url: str, path: str, head: bytes, body_chunks, timeout: float = 30.0) -> tuple[int, bytes]:
    """POST over a raw socket, sending the body while reading the answer (the server may answer 413 early and
    close); returns (status, response bytes). Never sends more than the chunks given."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed; read what it said
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate", "/v1/load_lora_adapter"])
def test_twenty_megabyte_bodies_are_413(bad_server, http, path):
    """With Content-Length the 413 comes before the body is read; chunked, once 4 MiB have arrived."""
    filler = b'{"prompt": "' + b"x" * (1 << 20)
    chunks = [filler] + [b"x" * (1 << 20)] * 19
    sized = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
             f"Content-Length: {TWENTY_MB}\r\n\r\n").encode()
    status, data = _raw_post(bad_server.url, path, sized, iter(chunks))
    assert status == 413 and b"max-body-bytes" in data, data[:300]

    chunked = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
    encoded = (b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    status, data = _raw_post(bad_server.url, path, chunked, encoded)
    assert status == 413 and b"max-body-bytes" in data, data[:300]
    still_serves(http)


def test_twenty_megabyte_body_with_httpx(bad_server, http):
    """The same through an ordinary client: it gets the 413 (or, at worst, a closed connection), never a 5xx."""
    try:
        r = httpx.post(f"{bad_server.url}/v1/completions", content=b"x" * TWENTY_MB,
                       headers={"content-type": "application/json"}, timeout=60)
        refused(r, 413, "max-body-bytes")
    except (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError):
        pass
    still_serves(http)


# --- refused requests must not mint metrics labels -----------------------------------------------------------

def test_refused_requests_do_not_create_metric_labels(http, vocab):
    """Every error is counted per adapter; a name the server does not know must land under '<unknown>', or
    any client could grow /metrics without bound by sending bad requests with made-up model names."""
    names = [f"made-up-{i}" for i in range(3)]
    for name in names:
        assert http.post("/v1/completions", json={**NORMAL, "model": name}).status_code == 404
        assert http.post("/v1/completions", json={**NORMAL, "model": name, "prompt": [vocab]}).status_code == 400
        assert http.post("/v1/completions", json={**NORMAL, "model": name, "max_tokens": BIG}).status_code == 400
        assert http.post("/generate", json={**TGI, "parameters": {"adapter_id": name,
                                                                  "max_new_tokens": BIG}}).status_code == 422
    labels = {s.labels.get("adapter") for s in samples(http)}
    assert not labels & set(names), sorted(labels & set(names))


# --- schemathesis over the app's own OpenAPI schema ----------------------------------------------------------

FUZZ_EXAMPLES = 40  # per operation and mode; 13 operations x 2 modes take ~20 s here


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir, root):
    """max_model_len 32, so no generated request can ask for much work; admin open to loopback as usual."""
    config = engine_config(tiny_model_dir, root, max_model_len=32, max_num_seqs=16, max_num_batched_tokens=512)
    with live_server(config, ServerConfig(shutdown_timeout=2, max_body_bytes=256 * 1024)) as live:
        yield live


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_5xx(fuzz_server, mode):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    failures: list[str] = []
    skipped: list[str] = []
    statuses: list[int] = []
    started = time.monotonic()
    for operation in operations:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        def run(case):
            response = case.call(base_url=fuzz_server.url, timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} body={case.body!r:.300} -> "
                                f"{response.status_code} {response.text[:300]}")

        try:
            run()
        except Unsatisfiable:  # negative mode: an operation with no input to get wrong (GET /health)
            assert mode == "negative", operation.label
            skipped.append(operation.label)
    assert not failures, "\n".join(failures[:10])
    assert time.monotonic() - started < 120
    assert len(skipped) < len(operations) / 2, skipped  # most operations were fuzzed
    if mode == "positive":  # valid inputs must mostly get through, or the fuzzing only hit the validators
        assert sum(200 <= s < 300 for s in statuses) >= 10, sorted(set(statuses))
    with fuzz_server.client() as http:
        still_serves(http)
