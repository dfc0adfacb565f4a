"""Command line: `swapserve serve|train` == `python -m server serve|train`; the only place that parses arguments.

Every flag can also be set by the environment variable SWAPSERVE_<FLAG> (e.g. --max-loras -> SWAPSERVE_MAX_LORAS);
a flag on the command line wins over the environment. List flags take comma-separated values from the
environment (SWAPSERVE_LORA_MODULES="a=/adapters/a,b=/adapters/b"); switches take 1/true/yes/on.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from server import progress
from server.api.settings import ServerConfig
from server.api.tenant_keys import load_key_file
from server.config import EngineConfig
from server.train import add_train_arguments, run_train

ENV_PREFIX = "SWAPSERVE_"


@dataclass(frozen=True)
class Flag:
    name: str  # --name
    type: Any  # int | float | str | list (repeatable) | bool (switch)
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


ENGINE_FLAGS = (
    Flag("model", str, "", "Hub id, local Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct)"),
    Flag("served-model-name", str, "", "name clients use as `model` for the base model (default: from --model)"),
    Flag("dtype", str, "auto", "weight and activation dtype", ("auto", "float32", "bfloat16", "float16")),
    Flag("device", str, "auto", "where the model runs (auto: cuda when available)", ("auto", "cpu", "cuda")),
    Flag("quantization", str, "none", "quantize the base model's linear layers", ("none", "int8", "nf4", "fp4")),
    Flag("lora-modules", list, [], "adapters loaded and pinned at start, as NAME=PATH (repeatable)",
         metavar="NAME=PATH"),
    Flag("adapter-root", list, [], "directory adapters may be loaded from; an adapter's name is its directory "
         "name (repeatable)", metavar="DIR"),
    Flag("max-loras", int, 16, "adapter slots on the device; also the most distinct adapters in one step"),
    Flag("max-cpu-loras", int, 64, "adapters kept in host memory (LRU), >= --max-loras (unset: 64, or --max-loras "
         "when that is more)"),
    Flag("max-cpu-lora-bytes", int, 4 << 30, "byte budget of the host adapter tier, held hard: adapters with "
         "requests in flight and the load in progress count against it; an adapter larger than it is refused "
         "with 400"),
    Flag("cpu-lora-wait", float, 10.0, "seconds an adapter load waits for room under --max-cpu-lora-bytes "
         "(adapters with requests in flight cannot be evicted) before its requests get 503 with Retry-After",
         metavar="SECONDS"),
    Flag("max-lora-rank", int, 16, "largest adapter rank accepted"),
    Flag("max-adapters-per-request", int, 4, "most adapters one request may mix (the `adapters` field: "
         "[{name, scale}, ...]); each counts against --max-loras in the step"),
    Flag("max-adapter-bytes", int, 1 << 30, "largest adapter file accepted, in bytes"),
    Flag("max-num-seqs", int, 32, "most sequences in the running batch"),
    Flag("max-model-len", int, 2048, "prompt + generated tokens per sequence; longer requests get 400"),
    Flag("max-num-batched-tokens", int, 0, "tokens computed per step: one per running sequence plus prefill chunks; "
         "a longer prompt is split across steps (chunked prefill), so this bounds how long one step can stall "
         "the running streams. 0: 256 on CPU, 2048 on GPU (at least --max-num-seqs)"),
    Flag("long-prefill-token-threshold", int, 0, "most prompt tokens one request computes in a step (vLLM's "
         "flag): a long prompt then leaves part of each step's budget to requests that arrive after it, which "
         "start (and stream) beside it instead of waiting for its whole prefill; the long prompt takes more steps. "
         "0: no cap but --max-num-batched-tokens", metavar="TOKENS"),
    Flag("kv-cache-memory", str, "auto", "memory for the paged KV cache, taken once at start: a size (4GiB, 512MiB, "
         "2e9) or a fraction 0 < f <= 1 of the memory free then. auto: on CPU min(4 GiB, half the free RAM), on "
         "GPU 90%% of the free device memory, each capped at what --max-num-seqs sequences of --max-model-len "
         "tokens could hold twice over. On CPU the pool's pages are made resident from the start (like vLLM's "
         "CPU backend and llama.cpp), on a background thread, so no step pays their first-touch page faults",
         metavar="SIZE"),
    Flag("block-size", int, 16, "tokens per KV-cache block (the unit of allocation and of prefix reuse)"),
    Flag("enable-prefix-caching", bool, True, "reuse the KV of earlier requests' full blocks with the same tokens "
         "and the same adapter content (a hash of its weights and config, never its name); freed blocks stay "
         "cached until their memory is needed (LRU). --no-enable-prefix-caching turns it off"),
    Flag("max-waiting", int, 256, "waiting-queue bound; beyond it requests get 429 with Retry-After"),
    Flag("allow-hub-adapters", bool, False, "allow adapters from the Hugging Face Hub (orgs in --hub-adapter-org)"),
    Flag("hub-adapter-org", list, [], "Hub organisation adapters may come from (repeatable)", metavar="ORG"),
    Flag("adapters-cache", str, "adapters_cache", "directory Hub adapters are downloaded into"),
    Flag("adapters-cache-bytes", int, 10 << 30, "cap on the Hub adapters cache: the least recently used "
         "repositories are deleted to make room; a Hub adapter's size is checked from the Hub's file metadata "
         "before it is downloaded (over --max-adapter-bytes: 400, nothing downloaded)"),
    Flag("seed", int, 0, "engine seed for requests that give none"),
    Flag("threads", int, 0, "torch CPU threads for the model (0: on CPU every core but one, which is left to "
         "the HTTP server, the step loop and the adapter loader; torch's default on GPU). On a shared CPU host "
         "fewer threads can be much faster: threads that wait for cores other processes hold "
         "stall every matmul"),
    Flag("cache-dir", str, "", "where converted models are cached: a .gguf --model is dequantized to safetensors "
         "once and later start-ups load that copy (default: $XDG_CACHE_HOME/swapserve or ~/.cache/swapserve)",
         metavar="DIR"),
    Flag("adapter-loader", str, "process", "where adapters are read, validated and packed: a helper process "
         "(running streams keep their pace while adapters load) or a thread of the server process (no extra "
         "process, but each load stalls the streams for its Python time)", ("process", "thread")),
    Flag("lora-kernel", str, "auto", "how batched LoRA is computed: triton (Punica-style shrink/expand kernels: "
         "BGMV for decode steps, SGMV for prefill; CUDA, any float dtype), numba (a compiled CPU loop over each "
         "adapter's tokens; float32 on CPU, 1.6-2x faster than bmm when many adapters share a decode step), "
         "reference (plain torch bmm / matmul, the oracle the others are tested against), auto (triton on CUDA "
         "with triton installed, numba on a float32 CPU model with numba installed, else reference)",
         ("auto", "reference", "numba", "triton")),
    Flag("lora-overlap", str, "auto", "run the compiled CPU LoRA kernel on a spare core while the base model's GEMM "
         "runs, for every step with an adapter (on 2 cores: 16 adapters x 2 tokens -8..13%% a decode step, one "
         "adapter -4%%, a 16-adapter prefill -8%%). The worker spin-waits for the next layer while a step runs (a wake-up per "
         "layer would cost more than it saves) and sleeps between steps. auto: when the numba kernel is in use "
         "and a core is left beside --threads", ("auto", "on", "off")),
    Flag("attention-kernel", str, "auto", "how decode attention reads the paged KV cache: numba (a compiled CPU "
         "loop reading each cached key and value once where it lies; float32 on CPU, 4-5x the torch path's speed "
         "per layer), triton (one kernel reading the cache in place through device block tables, with an online "
         "softmax over blocks; CUDA, any float dtype; tested under Triton's interpreter only, not yet run on a "
         "GPU), torch (gather the blocks, then SDPA: the reference), auto (numba for float32 on CPU with numba "
         "installed, triton on CUDA with triton installed, else torch)", ("auto", "numba", "torch", "triton")),
    Flag("cpu-gemm", str, "auto", "how the base model's float32 linear layers multiply on CPU: onednn (each weight "
         "packed once into oneDNN's blocked layout, replacing the dense copy, so no extra memory; 2-3x torch's "
         "default MKL sgemm on AMD EPYC from 2 rows up), torch (F.linear as loaded), auto (onednn for float32 on "
         "an x86 CPU, for weights of at least 65536 elements, where oneDNN's per-call cost pays; else torch)",
         ("auto", "onednn", "torch")),
    Flag("generation-config", str, "auto", "auto: a request that omits temperature, top_p, top_k or "
         "repetition_penalty gets the model's generation_config.json value where it sets one (vLLM's default); "
         "vllm: the neutral defaults (temperature 1, top_p 1, no top_k, no penalty)", ("auto", "vllm")),
    Flag("overlap-token-masks", bool, True, "build structured-output requests' token masks on a worker thread "
         "while the step's forward runs (vLLM's overlap) instead of after it; --no-overlap-token-masks turns it "
         "off"),
)
SERVER_FLAGS = (
    Flag("host", str, "127.0.0.1", "address to listen on (0.0.0.0 exposes the server; set --api-key then)"),
    Flag("port", int, 8000, "port to listen on"),
    Flag("api-key", str, None, "require `Authorization: Bearer KEY` on inference routes; with --api-keys-file "
         "too, KEY stays one more key that reaches every model without limits"),
    Flag("api-keys-file", str, None, "tenant keys: a JSON (.json) or YAML (.yaml/.yml) list of {key (plain or "
         "sha256:<hex>), name, adapters (name globs), base_model, rpm, tpm, max_concurrent}; a key reaches only "
         "the adapters its globs match (403 otherwise) and gets 429 with Retry-After over its limits. Re-read when "
         "it changes (no restart); a malformed file refuses start-up, and at a reload keeps the old keys and logs "
         "the line at fault. Tenant keys never open admin routes; with this file /metrics (it names every tenant) "
         "takes --admin-key too. See SECURITY.md", metavar="FILE"),
    Flag("admin-key", str, None, "require `Authorization: Bearer KEY` on admin routes (without it: loopback only, "
         "and with --api-keys-file only a loopback client sending --api-key)"),
    Flag("shutdown-timeout", float, 30.0, "seconds SIGTERM waits for in-flight requests before aborting them"),
    Flag("max-body-bytes", int, 4 << 20, "largest request body accepted; larger ones get 413"),
    Flag("max-prompts", int, 256, "most generations one request may start (prompts x n in /v1/completions; "
         "lm-eval sends its whole batch as one request); each also counts against --max-waiting"),
    Flag("log-level", str, "info", "logging level", ("critical", "error", "warning", "info", "debug", "trace")),
    Flag("enable-log-requests", bool, False, "log one line per finished request (logger swapserve.requests, at "
         "info): its id, what it read (the base model, an adapter, or a mixture such as a*0.7+b*-0.3), its prompt, "
         "cached and generated tokens, finish reason, time to first token and end-to-end time"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swapserve", description="One base model, many hot-swapped adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,train}")
    serve = commands.add_parser("serve", help="run the HTTP server (OpenAI, TGI and admin APIs)",
                                epilog=f"Every flag is also read from {ENV_PREFIX}<FLAG>, e.g. {ENV_PREFIX}MAX_LORAS.")
    for flag in ENGINE_FLAGS + SERVER_FLAGS:
        _add_flag(serve, flag)
    _add_vllm_spellings(serve)
    add_train_arguments(commands.add_parser("train", help="fine-tune a LoRA or IA3 adapter and optionally hot-load it"))
    return parser


def _add_vllm_spellings(parser: argparse.ArgumentParser) -> None:
    """vLLM's spellings a `vllm serve` command line brings: the same meaning where swapserve has it, else a
    refusal naming swapserve's flag (vllm_spellings), never silently ignored."""
    group = parser.add_argument_group("vLLM spellings", "accepted so that a `vllm serve` command line runs")
    group.add_argument("model_tag", nargs="?", metavar="MODEL", help="the model, as in `vllm serve MODEL` (--model)")
    group.add_argument("--enable-lora", action="store_true",
                       help="vLLM's switch for adapters: they are always on here, so it changes nothing")
    group.add_argument("--disable-log-requests", action="store_true",
                       help="vLLM's: requests are logged only with --enable-log-requests (refused together with it)")
    group.add_argument("--uvicorn-log-level", dest="log_level", type=str.lower, metavar="LEVEL",
                       choices=("critical", "error", "warning", "info", "debug", "trace"),
                       help="vLLM's name for --log-level")
    group.add_argument("--gpu-memory-utilization", type=float, metavar="FRACTION",
                       help="vLLM's share of the device for weights and KV: refused, use --kv-cache-memory")


def vllm_spellings(args: argparse.Namespace, values: dict) -> None:
    """Apply (or refuse, naming swapserve's flag) the vLLM spellings of _add_vllm_spellings to ``values``."""
    tag = getattr(args, "model_tag", None)
    if tag is not None:
        if args.model is not None and args.model != tag:
            raise ValueError(f"the model is given twice ({tag!r} and --model {args.model!r}); give one")
        values["model"] = tag
    if getattr(args, "gpu_memory_utilization", None) is not None:
        raise ValueError("--gpu-memory-utilization is vLLM's share of the device for weights and KV cache; swapserve "
                         "sizes the KV cache alone: give --kv-cache-memory as a fraction of the free memory (e.g. "
                         "0.9) or in bytes (e.g. 8GiB)")
    if getattr(args, "disable_log_requests", False) and values.get("enable_log_requests"):
        raise ValueError("--disable-log-requests and --enable-log-requests contradict each other; give one")


def _add_flag(parser: argparse.ArgumentParser, flag: Flag) -> None:
    shown = "" if flag.default in (None, "", []) else f"; default {flag.default}"
    help_text = f"{flag.help} (env {flag.env}{shown})"
    if flag.type is bool and flag.default:  # on by default: --name / --no-name, like vLLM's switches
        parser.add_argument(f"--{flag.name}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
    elif flag.type is bool:
        parser.add_argument(f"--{flag.name}", action="store_const", const=True, default=None, help=help_text)
    elif flag.type is list:
        parser.add_argument(f"--{flag.name}", action="extend", nargs="+", default=None, help=help_text,
                            metavar=flag.metavar)
    else:
        kind = str.lower if flag.choices and flag.type is str else flag.type  # INFO reads as info
        parser.add_argument(f"--{flag.name}", type=kind, default=None, choices=flag.choices,
                            help=help_text, metavar=flag.metavar)


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def resolve(flag: Flag, cli_value: Any, environ: dict[str, str]) -> Any:
    """The flag's value: command line, else environment, else default."""
    if cli_value is not None:
        return cli_value
    raw = environ.get(flag.env)
    if raw is None or (raw == "" and flag.type is not str):
        return list(flag.default) if flag.type is list else flag.default
    if flag.type is bool:
        word = raw.strip().lower()
        if word not in TRUE + FALSE:
            raise ValueError(f"{flag.env}={raw!r}: give one of {', '.join(TRUE + FALSE)}")
        return word in TRUE
    if flag.type is list:
        return [item.strip() for item in raw.split(",") if item.strip()]
    try:
        value = flag.type(raw).lower() if flag.choices and flag.type is str else flag.type(raw)
    except ValueError:
        raise ValueError(f"{flag.env}={raw!r}: not a valid value for --{flag.name}") from None
    if flag.choices and value not in flag.choices:
        raise ValueError(f"{flag.env} must be one of {', '.join(flag.choices)}; got {value!r}")
    return value


def parse_lora_modules(items: list[str]) -> dict[str, str]:
    modules = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules expects NAME=PATH, got {item!r}")
        modules[name.strip()] = path.strip()
    return modules


def build_configs(args: argparse.Namespace, environ: dict[str, str]) -> tuple[EngineConfig, ServerConfig]:
    """EngineConfig and ServerConfig from parsed flags and the environment (raises ValueError when invalid)."""
    values = {f.dest: resolve(f, getattr(args, f.dest), environ) for f in ENGINE_FLAGS + SERVER_FLAGS}
    vllm_spellings(args, values)
    unset = getattr(args, "max_cpu_loras", None) is None and not environ.get(ENV_PREFIX + "MAX_CPU_LORAS")
    if unset and values["max_loras"] > values["max_cpu_loras"]:  # vLLM's default: the device tier's size
        values["max_cpu_loras"] = values["max_loras"]
    values["lora_modules"] = parse_lora_modules(values["lora_modules"])
    values["adapter_roots"] = values.pop("adapter_root")
    values["hub_adapter_orgs"] = values.pop("hub_adapter_org")
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    server_fields = {f.name for f in dataclasses.fields(ServerConfig)}
    engine = EngineConfig(**{k: v for k, v in values.items() if k in engine_fields})
    server = ServerConfig(**{k: v for k, v in values.items() if k in server_fields})
    if engine.served_model_name in engine.lora_modules:  # "model": that name would always read the base model
        raise ValueError(f"--lora-modules names an adapter {engine.served_model_name!r}, the base model's served "
                         "name (--served-model-name): give one of them another name")
    if server.api_keys_file:  # a malformed key file refuses start-up with the line at fault (KeyFileError)
        load_key_file(server.api_keys_file, {"--api-key": server.api_key, "--admin-key": server.admin_key})
    return engine, server


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the server's own handlers are in place (imports, parsing)
        return 130


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress.configure()  # bars for downloads, conversion and training on a terminal; none in logs
    if args.command == "train":
        return run_train(args)
    try:
        engine_config, server_config = build_configs(args, dict(os.environ))
    except ValueError as exc:
        parser.error(str(exc))
    level = "DEBUG" if server_config.log_level == "trace" else server_config.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.api.serve import serve

    return serve(engine_config, server_config)


if __name__ == "__main__":
    sys.exit(main())
