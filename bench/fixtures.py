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
    template = _peft_template(directory, lora_config(rank))
    made = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        made[name] = _save_adapter(root / name, template, {k: 0.02 * torch.randn(t.shape, generator=gen)
                                                         for k, t in template[1].items()})
    return made


def _peft_template(directory: Path, config) -> tuple[bytes, dict[str, torch.Tensor]]:
    """What PEFT saves for ``config`` on this model at its initial weights: (adapter_config.json, tensors).
    Every adapter of one config shares its keys, shapes and config; writing the others' tensors straight to
    safetensors takes ~0.1 s an adapter where PEFT's save_pretrained took ~0.6 (19.6 MB at r16 on SmolLM2)."""
    import tempfile

    from peft import get_peft_model
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        get_peft_model(load_base(directory), config).save_pretrained(tmp, safe_serialization=True)
        return (Path(tmp, "adapter_config.json").read_bytes(),
                load_file(str(Path(tmp, "adapter_model.safetensors"))))


def _save_adapter(out: Path, template: tuple[bytes, dict], tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT adapter directory as save_pretrained writes it: the template's config, these tensors."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_bytes(template[0])
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out


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
    """kinds: name -> lora | dora | ia3 | adalora. One PEFT model per kind, random weights per adapter: IA3
    vectors near 1, DoRA magnitudes near their initial values (the base weights' norms), AdaLoRA's E larger."""
    made = {}
    for kind in dict.fromkeys(kinds.values()):
        template = _peft_template(directory, typed_config(kind, rank))
        for i, name in enumerate(n for n, k in kinds.items() if k == kind):
            gen = torch.Generator().manual_seed(seed * 1000 + 500 + i)
            tensors = {}
            for key, init in template[1].items():
                noise = torch.randn(init.shape, generator=gen)
                if "ia3_l" in key:
                    tensors[key] = 1 + 0.1 * noise
                elif "lora_magnitude_vector" in key:
                    tensors[key] = init * (1 + 0.05 * noise)
                elif "lora_E" in key:
                    tensors[key] = 0.5 * noise
                elif "lora_" in key:
                    tensors[key] = 0.02 * noise
                else:  # bookkeeping PEFT saves beside the weights: as initialized
                    tensors[key] = init
            made[name] = _save_adapter(root / name, template, tensors)
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
