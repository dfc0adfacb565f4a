"""`swapserve train`: fine-tune a LoRA or IA3 adapter with transformers' Trainer, save it in PEFT format, and
optionally hot-load it into a running server through the admin API (POST /v1/load_lora_adapter).

--data is JSON lines, one example per line, in any of three forms (they may be mixed; blank lines are skipped):
  {"prompt": str, "completion": str}           loss on the completion and EOS; the prompt is encoded as the
                                               server encodes a /v1/completions prompt
  {"text": str}                                loss on every token and EOS
  {"messages": [{"role": str, "content": str}]}  rendered with the tokenizer's chat template as the server renders
                                               /v1/chat/completions; loss only on the assistant turns
Exit status: 0 done, 1 trained and saved but --register failed, 2 bad flags, model or data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from server import progress

IGNORE_INDEX = -100  # label of tokens that carry no loss
DEFAULT_LR = {"lora": 2e-4, "ia3": 3e-3}
FORMS = '{"prompt", "completion"}, {"text"} or {"messages"}'


class DataError(ValueError):
    """A --data problem, worded for the user: it names the file and the line."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="", help="base model: Hub id, local Hugging Face directory or .gguf file "
        "(default: SmolLM2-135M-Instruct)")
    add("--data", required=True, type=Path, metavar="FILE.jsonl", help=f"training examples, one JSON object a line: "
        f"{FORMS}")
    add("--output", required=True, type=Path, metavar="DIR", help="where adapter_config.json and "
        "adapter_model.safetensors are written")
    add("--peft", default="lora", choices=("lora", "ia3"), help="adapter type (default lora)")
    add("--r", type=int, default=8, help="LoRA rank (default 8; a server takes ranks up to its --max-lora-rank)")
    add("--alpha", type=float, default=16, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    add("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    add("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
        help="module names to adapt, space- or comma-separated (default: all linear layers but the output head)")
    add("--max-steps", type=int, default=-1, help="optimizer steps; overrides --epochs when > 0")
    add("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    add("--lr", type=float, default=None, help="learning rate (default 2e-4 for lora, 3e-3 for ia3)")
    add("--batch-size", type=int, default=4, help="examples per step (default 4)")
    add("--max-length", type=int, default=1024, help="tokens kept per example; longer ones are cut (default 1024)")
    add("--quantization", default="none", choices=("none", "nf4"), help="nf4: train on a 4-bit base (QLoRA)")
    add("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="base weight dtype")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train (auto: cuda if present)")
    add("--seed", type=int, default=0, help="seed for adapter init, shuffling and dropout (default 0)")
    add("--logging-steps", type=int, default=10, help="log the loss every N steps (default 10)")
    add("--register", metavar="URL", help="after training, load the adapter into the server at URL")
    add("--name", help="adapter name to register under (with --register)")
    add("--replace", action="store_true", help="with --register: replace an adapter already loaded as --name")
    add("--admin-key", default=None, help="the server's admin key (env SWAPSERVE_ADMIN_KEY)")


def run_train(args: argparse.Namespace) -> int:
    """Train, save, register; returns the exit status (messages go to stderr)."""
    try:
        _check_flags(args)
        rows = read_rows(args.data)
        loaded = _load_base(args)
        examples = [encode(row, loaded.tokenizer, args.max_length, f"{args.data}:{n}") for n, row in rows]
        model = _with_adapter(loaded.model, args)
    except (ValueError, OSError) as exc:  # DataError is a ValueError
        _say(f"error: {exc}")
        return 2
    history = fit(model, examples, loaded.tokenizer.pad_token_id, args, loaded.device.type == "cpu")
    save(model, args.output, history)
    _say(f"saved {args.peft} adapter to {args.output}")
    if args.register:
        return register(args.register, args.name, args.output, args.admin_key, args.replace)
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    from server.config import valid_adapter_name

    args.target_modules = [m for item in args.target_modules for m in item.split(",") if m.strip()]
    args.lr = DEFAULT_LR[args.peft] if args.lr is None else args.lr
    args.admin_key = args.admin_key or os.environ.get("SWAPSERVE_ADMIN_KEY")
    for flag in ("r", "batch_size", "max_length", "logging_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.max_steps <= 0 and args.epochs <= 0:
        raise ValueError("give --max-steps > 0 or --epochs > 0")
    if bool(args.register) != bool(args.name):
        raise ValueError("--register URL and --name NAME go together")
    if args.register and urllib.parse.urlsplit(args.register).scheme not in ("http", "https"):
        raise ValueError(f"--register {args.register!r}: give the server's URL, e.g. http://127.0.0.1:8000")
    # checked before training, not found after it when saving
    taken = next((p for p in (args.output, *args.output.parents) if p.exists() and not p.is_dir()), None)
    if taken is not None:
        raise ValueError(f"--output {args.output}: {taken} is a file, not a directory; give a directory")
    if args.name and not valid_adapter_name(args.name):
        raise ValueError(f"--name {args.name!r}: use letters, digits, '.', '_', '-' (starting with a letter or digit)")


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for every non-blank line, each checked to be one of the three forms."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    with path.open("rb") as lines:
        for n, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: not UTF-8 text") from None
            if line.strip():
                rows.append((n, _parse_row(line, f"{path}:{n}")))
    if not rows:
        raise DataError(f"{path}: no examples (the file is empty); expected one JSON object a line: {FORMS}")
    return rows


def _parse_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object ({FORMS}), got {type(row).__name__}")
    if "messages" in row:
        _check_messages(row["messages"], where)
    elif "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string (rows with 'prompt' need 'completion' too)")
    elif "text" in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
    else:
        raise DataError(f"{where}: expected {FORMS}; got keys {sorted(row)}")
    return row


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: 'messages' has no assistant turn to learn from")


def encode(row: dict, tokenizer, max_length: int, where: str) -> dict:
    """{"input_ids", "labels"} (labels = input_ids with IGNORE_INDEX where no loss), cut to max_length."""
    if "messages" in row:
        pieces = _chat_pieces(row["messages"], tokenizer, where)
    elif "prompt" in row:
        pieces = [(tokenizer.encode(row["prompt"]), False),
                  (tokenizer.encode(row["completion"], add_special_tokens=False) + [tokenizer.eos_token_id], True)]
    else:
        pieces = [(tokenizer.encode(row["text"]) + [tokenizer.eos_token_id], True)]
    input_ids = [t for ids, _ in pieces for t in ids][:max_length]
    labels = [t if learn else IGNORE_INDEX for ids, learn in pieces for t in ids][:max_length]
    if all(t == IGNORE_INDEX for t in labels):
        raise DataError(f"{where}: nothing to learn within --max-length {max_length} (the prompt fills it)")
    return {"input_ids": input_ids, "labels": labels}


def _chat_pieces(messages: list[dict], tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """(token ids, learn?) pieces: context rendered up to each assistant turn's generation prompt, then the turn.

    Relies on the template rendering a conversation's prefix as a prefix of its text (true of ordinary
    templates); a template that rewrites earlier turns cannot be masked this way and is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: 'messages' rows need a tokenizer with a chat template; this one has none")

    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=prompt, tokenize=False)

    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context, full = render(i, True), render(i + 1, False)
        if not (context.startswith(done) and full.startswith(context)):
            raise DataError(f"{where}: the chat template does not render this conversation incrementally, so the "
                            "assistant turns cannot be told apart; use {\"prompt\", \"completion\"} rows instead")
        pieces.append((tokenizer.encode(context[len(done):], add_special_tokens=False), False))
        pieces.append((tokenizer.encode(full[len(context):], add_special_tokens=False), True))
        done = full
    return pieces


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a batch: input_ids/labels/attention_mask, each [batch, longest]."""
    import torch

    width = max(len(e["input_ids"]) for e in batch)
    pad = [width - len(e["input_ids"]) for e in batch]
    return {
        "input_ids": torch.tensor([e["input_ids"] + [pad_id] * p for e, p in zip(batch, pad)]),
        "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * p for e, p in zip(batch, pad)]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * p for e, p in zip(batch, pad)]),
    }


def _load_base(args: argparse.Namespace):
    """The base model and tokenizer through the server's loader, so every --model form works here too."""
    from transformers import set_seed

    from server.config import EngineConfig
    from server.engine.loader import load_model, usable_cores

    set_seed(args.seed)
    # every core: training has no server to leave one for (EngineConfig's threads=0 would keep one free)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                          threads=usable_cores())
    args.model = config.model  # "" -> the default model, recorded as the adapter's base
    _say(f"loading {config.model}" + (" (nf4)" if args.quantization == "nf4" else ""))
    return load_model(config)


def _with_adapter(model, args: argparse.Namespace):
    from peft import IA3Config, LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
    from transformers import set_seed

    if args.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = _linear_names(model) if args.target_modules == ["all-linear"] else args.target_modules
    if args.peft == "lora":
        config = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=targets,
                            task_type="CAUSAL_LM")
    else:  # feedforward layers get their input scaled, the others their output; PEFT knows which for common models
        feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
        config = IA3Config(target_modules=targets, feedforward_modules=[m for m in targets if m in feedforward],
                           task_type="CAUSAL_LM")
    set_seed(args.seed)  # adapter init depends on the seed only, not on what loading consumed
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = args.model
    trainable, total = peft_model.get_nb_trainable_parameters()
    _say(f"{args.peft}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%)")
    return peft_model


def _linear_names(model) -> list[str]:
    """Names of the linear layers but the output head, as PEFT's "all-linear" (spelled out: PEFT cannot load
    an IA3 config whose "all-linear" it expanded itself)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear | Conv1D) and module is not head})


def fit(model, examples: list[dict], pad_id: int, args: argparse.Namespace, on_cpu: bool) -> list[dict]:
    """Run Trainer (a progress bar on a terminal, loss every --logging-steps); returns its log history."""
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="swapserve-train-") as scratch:
        settings = TrainingArguments(
            output_dir=scratch, save_strategy="no", report_to="none", use_cpu=on_cpu, seed=args.seed,
            max_steps=args.max_steps, num_train_epochs=args.epochs, learning_rate=args.lr,
            per_device_train_batch_size=args.batch_size, logging_steps=args.logging_steps, logging_first_step=True,
            remove_unused_columns=False, label_names=["labels"], dataloader_pin_memory=not on_cpu,
            disable_tqdm=not progress.bars_enabled())
        trainer = Trainer(model=model, args=settings, train_dataset=examples,
                          data_collator=lambda batch: collate(batch, pad_id))
        trainer.train()
    return trainer.state.log_history


def save(model, output: Path, history: list[dict]) -> None:
    """adapter_config.json + adapter_model.safetensors (PEFT format), and the loss log as training_log.jsonl."""
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output, safe_serialization=True, save_embedding_layers=False)  # never trained here
    with (output / "training_log.jsonl").open("w", encoding="utf-8") as log:
        for entry in history:
            log.write(json.dumps(entry) + "\n")


def register(url: str, name: str, output: Path, admin_key: str | None, replace: bool) -> int:
    """Load the saved adapter into the running server; the path must lie under one of its --adapter-root dirs."""
    body = {"lora_name": name, "lora_path": str(output.resolve()), "load_inplace": replace}
    headers = {"Content-Type": "application/json"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    request = urllib.request.Request(url.rstrip("/") + "/v1/load_lora_adapter", json.dumps(body).encode(),
                                     headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            _say(f"registered as '{name}' at {url}: {response.read().decode(errors='replace')}")
            return 0
    except urllib.error.HTTPError as exc:
        reason = _error_message(exc.read())
        hint = " (pass --replace to load it in place)" if "already been loaded" in reason else ""
        _say(f"error: {url} refused the adapter ({exc.code}): {reason}{hint}")
    except (urllib.error.URLError, OSError) as exc:
        _say(f"error: cannot reach {url}: {getattr(exc, 'reason', exc)}")
    _say(f"the adapter is saved in {output}; register it later with POST {url}/v1/load_lora_adapter")
    return 1


def _error_message(raw: bytes) -> str:
    text = raw.decode(errors="replace")
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip() or "no details"


def _say(message: str) -> None:
    print(f"swapserve train: {message}", file=sys.stderr, flush=True)
