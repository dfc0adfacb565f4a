"""Load the resident base model and its tokenizer: Hub id, local HF directory or .gguf file; plain or
bitsandbytes-quantized; never with trust_remote_code."""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from server.config import EngineConfig

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    device: torch.device
    dtype: torch.dtype  # compute dtype (activations, KV cache, adapter slots)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU matmuls in half precision are slow and less exact


def _source(model: str) -> tuple[str, dict]:
    """(from_pretrained path or id, extra kwargs) for a Hub id, a local directory or a .gguf file."""
    path = Path(model)
    if model.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: GGUF file not found")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def _quantization_config(kind: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if kind == "none":
        return None
    if kind == "int8":
        # threshold 0 turns off LLM.int8's outlier columns: with it on, a column is computed in fp16 when ANY row
        # of the batch has an outlier there, so one request's output would depend on what it is batched with
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=dtype)


def load_model(config: EngineConfig) -> LoadedModel:
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    where, extra = _source(config.model)
    common = dict(trust_remote_code=False, **extra)
    tokenizer = AutoTokenizer.from_pretrained(where, **common)
    quant = _quantization_config(config.quantization, dtype)
    kwargs = dict(dtype=dtype, attn_implementation="sdpa", trust_remote_code=False)
    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(where, **extra, **kwargs).to(device)
    elif "gguf_file" in extra:
        # transformers cannot quantize while reading GGUF: dequantize, save as safetensors, reload quantized
        plain = AutoModelForCausalLM.from_pretrained(where, **extra, **kwargs)
        with tempfile.TemporaryDirectory(prefix="swapserve-gguf-") as tmp:
            plain.save_pretrained(tmp)
            del plain
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, device_map={"": device},
                                                         **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(where, quantization_config=quant, device_map={"": device},
                                                     **kwargs)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, device, dtype)
