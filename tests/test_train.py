"""`swapserve train` (server/train.py): data checks, loss masks, and training runs on the tiny Llama that learn a
pattern, load in PEFT, and are served by a running server after --register with the same greedy tokens as PEFT."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest
import torch
from api.conftest import engine_config, free_port, live_server
from support import peft_model_for
from transformers import AutoTokenizer

from server.train import IGNORE_INDEX, add_train_arguments, encode, register, run_train

COMPLETION = " quick brown fox"  # every prompt "x: N" is answered with this
HELD_OUT = ["x: 123", "x: 987"]  # prompts not in the training data


def train_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(["--device", "cpu", "--dtype", "float32", *argv])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def losses(output: Path) -> list[float]:
    entries = [json.loads(line) for line in (output / "training_log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in entries if "loss" in e]


def peft_greedy(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> list[int]:
    """Greedy continuation of `prompt` as the server encodes it, ending at (without) EOS."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def served_greedy(http: httpx.Client, prompt: str, adapter: str | None, max_new_tokens: int = 8) -> list[int]:
    params = {"max_new_tokens": max_new_tokens, "details": True, **({"adapter_id": adapter} if adapter else {})}
    r = http.post("/generate", json={"inputs": prompt, "parameters": params})
    assert r.status_code == 200, r.text
    return [t["id"] for t in r.json()["details"]["tokens"] if not t["special"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A running server with an empty --adapter-root, and a LoRA trained into that root and --register-ed as
    'learned'."""
    root = tmp_path_factory.mktemp("train-root")
    data = write_jsonl(root.parent / "pattern.jsonl",
                       [{"prompt": f"x: {n}", "completion": COMPLETION} for n in range(48)])
    with live_server(engine_config(tiny_model_dir, root)) as server:
        args = train_args("--model", str(tiny_model_dir), "--data", str(data), "--output", str(root / "learned"),
                          "--max-steps", "30", "--batch-size", "8", "--lr", "1e-2", "--dropout", "0",
                          "--logging-steps", "5", "--register", server.url, "--name", "learned")
        assert run_train(args) == 0
        yield server, root / "learned"


def test_lora_learns_the_pattern_and_the_server_serves_it_like_peft(served, tiny_model_dir, tokenizer):
    server, output = served
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in output.iterdir()}
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["base_model_name_or_path"] == str(
        tiny_model_dir)
    logged = losses(output)
    assert len(logged) >= 5 and logged[-1] < 0.5 * logged[0], logged

    target = tokenizer.encode(COMPLETION, add_special_tokens=False)
    tuned, base = peft_model_for(tiny_model_dir, output), peft_model_for(tiny_model_dir, None)
    with server.client() as http:
        for prompt in HELD_OUT:
            learned = peft_greedy(tuned, tokenizer, prompt)
            assert learned == target, tokenizer.decode(learned)  # it stopped at EOS, as trained
            assert peft_greedy(base, tokenizer, prompt)[:len(target)] != target
            assert served_greedy(http, prompt, "learned") == learned
            assert served_greedy(http, prompt, None) != learned


def test_register_refuses_a_taken_name_unless_replacing_and_reports_failures(served, tmp_path, capsys):
    server, output = served
    assert register(server.url, "learned", output, None, replace=False) == 1
    assert "--replace" in capsys.readouterr().err
    assert register(server.url, "learned", output, None, replace=True) == 0
    assert register(server.url, "elsewhere", tmp_path, None, replace=False) == 1  # not under an --adapter-root
    assert register(f"http://127.0.0.1:{free_port()}", "learned", output, None, replace=False) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_ia3_trains_on_chat_rows(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"x: {n}"}, {"role": "assistant", "content": "brown fox"}]}
            for n in range(16)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = train_args("--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "ia3"),
                      "--peft", "ia3", "--max-steps", "10", "--lr", "5e-2", "--logging-steps", "3")
    assert run_train(args) == 0
    logged = losses(tmp_path / "ia3")
    assert logged[-1] < logged[0], logged
    model = peft_model_for(tiny_model_dir, tmp_path / "ia3")
    assert model.peft_config["default"].peft_type == "IA3"


def test_qlora_trains_on_an_nf4_base(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    args = train_args("--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "qlora"),
                      "--quantization", "nf4", "--max-steps", "6", "--lr", "1e-2", "--logging-steps", "2",
                      "--target-modules", "q_proj,v_proj", "down_proj")
    assert run_train(args) == 0
    logged = losses(tmp_path / "qlora")
    assert logged[-1] < logged[0], logged
    config = json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    peft_model_for(tiny_model_dir, tmp_path / "qlora", quantization="nf4")


@pytest.mark.parametrize("lines, message", [
    ([], "no examples (the file is empty)"),
    (['{"prompt": "a", "completion": "b"}', "", "{not json"], ":3: not valid JSON"),
    (['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], ":2: 'completion' must be a string"),
    (['{"input": "a", "output": "b"}'], ":1: expected {\"prompt\", \"completion\"}, {\"text\"} or {\"messages\"}"),
    (['["a", "b"]'], ":1: expected a JSON object"),
    (['{"text": ""}'], ":1: 'text' must be a non-empty string"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], ":1: 'messages' has no assistant turn"),
    (['{"messages": [{"role": "user"}]}'], ":1: messages[0] must be an object with string 'role' and 'content'"),
    (['{"text": "ok"}', b'{"text": "caf\xe9"}'], ":2: not UTF-8 text"),
])
def test_bad_data_exits_2_naming_the_line(tiny_model_dir, tmp_path, capsys, lines, message):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    args = train_args("--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "out"))
    assert run_train(args) == 2
    err = capsys.readouterr().err
    assert str(data) in err and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--register", "http://127.0.0.1:1"], "--register URL and --name NAME go together"),
    (["--register", "http://127.0.0.1:1", "--name", "../x"], "--name '../x'"),
    (["--r", "0"], "--r must be >= 1"),
    (["--register", "localhost", "--name", "x"], "give the server's URL"),
    (["--output", "{tmp}/ok.jsonl/out"], "is a file, not a directory"),
])
def test_bad_flags_exit_2_before_training(tmp_path, capsys, argv, message):
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": "hello"}])
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert run_train(train_args("--data", str(data), "--output", str(tmp_path / "out"), *argv)) == 2
    assert message in capsys.readouterr().err


def test_losses_fall_only_on_completion_and_assistant_tokens(tokenizer):
    from server.api.chat import chat_prompt_ids
    from server.api.protocol import ChatMessage

    eos = tokenizer.eos_token_id
    row = encode({"prompt": "x: 1", "completion": " fox"}, tokenizer, 64, "f:1")
    prompt = tokenizer.encode("x: 1")
    assert row["input_ids"][:len(prompt)] == prompt and row["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert row["labels"][len(prompt):] == tokenizer.encode(" fox", add_special_tokens=False) + [eos]

    text = encode({"text": "hello world"}, tokenizer, 64, "f:2")
    assert text["labels"] == text["input_ids"] == tokenizer.encode("hello world") + [eos]

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "world"}]
    chat = encode({"messages": messages}, tokenizer, 256, "f:3")
    learned = [t for t, label in zip(chat["input_ids"], chat["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "hello</s>world</s>"
    for turn in (2, 4):  # the context before each reply is exactly what the server feeds for that conversation
        context = chat_prompt_ids(tokenizer, [ChatMessage(**m) for m in messages[:turn]])
        assert chat["input_ids"][:len(context)] == context and chat["labels"][len(context)] != IGNORE_INDEX

    cut = encode({"prompt": "x: 1", "completion": " fox"}, tokenizer, len(prompt) + 1, "f:4")
    assert len(cut["input_ids"]) == len(prompt) + 1
    with pytest.raises(ValueError, match="f:5: nothing to learn within --max-length 2"):
        encode({"prompt": "x: 12345", "completion": " fox"}, tokenizer, 2, "f:5")
