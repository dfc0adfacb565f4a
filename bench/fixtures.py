"""What every system under test shares: the base model directory, the PEFT adapters and the prompts.

The default model ships as a Q4_1 GGUF; transformers dequantizes it on every load (~1 min here), so it is
converted once to an fp32 safetensors directory under the cache dir (server.engine.loader.cached_gguf_dir, the
same conversion and cache layout swapserve itself uses) and every system (HF, PEFT, swapserve) loads that
same directory.
"""
from __future__ import annotations

from pathlib import Path

import torch


def model_dir(model: str, cache_dir: str) -> Path:
    """An HF directory for ``model`` (a directory, or a .gguf converted to fp32 and cached by the server's loader)."""
    from server.config import default_model
    from server.engine.loader import cached_gguf_dir

    model = model or default_model()
    if not model.endswith(".gguf"):
        return Path(model)
    return cached_gguf_dir(Path(model), Path(cache_dir))[0]


def load_base(directory: Path, device: str = "cpu", dtype: str = "float32", quantization: str = "none"):
    """The plain HF model, placed and quantized the way swapserve's loader does it (same bitsandbytes config)."""
    from transformers import AutoModelForCausalLM

    from server.engine.loader import _quantization_config

    torch_dtype = getattr(torch, dtype)
    quant = _quantization_config(quantization, torch_dtype)
    extra = {"quantization_config": quant, "device_map": {"": device}} if quant else {}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype, attn_implementation="sdpa", **extra)
    if quant is None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def lora_config(rank: int):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)


def make_adapters(directory: Path, names: list[str], root: Path, rank: int, seed: int) -> dict[str, Path]:
    """Save one PEFT LoRA (r=rank on all 7 linear modules, random small weights, safetensors) per name."""
    from peft import get_peft_model

    peft_model = get_peft_model(load_base(directory), lora_config(rank))
    params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    made = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for p in params:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        made[name] = root / name
        peft_model.save_pretrained(made[name], safe_serialization=True)
    return made


def adapter_bytes(path: Path) -> int:
    return (path / "adapter_model.safetensors").stat().st_size


def typed_config(kind: str, rank: int):
    """PEFT configs of the other adapter types, on the same 7 linear modules as the LoRA adapters."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if kind == "lora":
        return lora_config(rank)
    if kind == "dora":
        return LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, target_modules=linear, lora_dropout=0.0)
    if kind == "ia3":
        return IA3Config(target_modules=linear, feedforward_modules=["down_proj"])
    if kind == "adalora":
        return AdaLoraConfig(init_r=rank, target_r=rank // 2, lora_alpha=2 * rank, target_modules=linear,
                             total_step=10)
    raise ValueError(kind)


def make_typed_adapters(directory: Path, kinds: dict[str, str], root: Path, rank: int, seed: int) -> dict[str, Path]:
    """kinds: name -> lora | dora | ia3 | adalora. One PEFT model per kind, random weights per adapter."""
    from peft import get_peft_model

    made = {}
    for kind in dict.fromkeys(kinds.values()):
        peft_model = get_peft_model(load_base(directory), typed_config(kind, rank))
        params = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n or "ia3_l" in n]
        init = {n: p.detach().clone() for n, p in params}
        for i, name in enumerate(n for n, k in kinds.items() if k == kind):
            gen = torch.Generator().manual_seed(seed * 1000 + 500 + i)
            with torch.no_grad():
                for n, p in params:
                    noise = torch.randn(p.shape, generator=gen)
                    if "ia3_l" in n:
                        p.copy_(1 + 0.1 * noise)
                    elif "lora_magnitude_vector" in n:
                        p.copy_(init[n] * (1 + 0.05 * noise))
                    elif "lora_E" in n:
                        p.copy_(0.5 * noise)
                    else:
                        p.copy_(0.02 * noise)
            made[name] = root / name
            peft_model.save_pretrained(made[name], safe_serialization=True)
    return made


def copy_adapters(template: Path, names: list[str], root: Path, seed: int) -> dict[str, Path]:
    """Cheap distinct adapters for the scale run: ``template``'s tensors, each scaled by a per-adapter,
    per-tensor factor and written as a new safetensors file (no PEFT model per adapter)."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(template / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed * 1000 + 7)
    made = {}
    for name in names:
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template / "adapter_config.json", out / "adapter_config.json")
        factors = 0.5 + torch.rand(len(tensors), generator=gen)
        save_file({k: (t * f).contiguous() for (k, t), f in zip(tensors.items(), factors.tolist())},
                  str(out / "adapter_model.safetensors"))
        made[name] = out
    return made
