"""`python -m bench.random_model --tokenizer DIR --out DIR [--config config.json] [--size 1b]`

A model directory with random weights, built from a config: for throughput only the shapes matter, so a GPU
run (bench/gpu.sh) needs no checkpoint, only a tokenizer and a config.json. ``--size 1b`` keeps the
tokenizer's vocabulary and widens everything else to a Llama-3.2-1B-class shape (hidden 2048, 16 layers,
32 heads / 8 KV heads, MLP 8192: ~1.1B parameters with SmolLM2's 49k vocabulary).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def build(tokenizer_dir: Path, out: Path, config_path: Path | None = None, size: str | None = None,
          seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((config_path or tokenizer_dir / "config.json").read_text())
    config.update(SIZES[size] if size else {})
    config.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{out}: {cfg.model_type}, {params / 1e6:.0f}M parameters, random weights")
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.random_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, type=Path, help="directory with tokenizer.json (and config.json)")
    p.add_argument("--out", required=True, type=Path, help="where to write the model directory")
    p.add_argument("--config", type=Path, help="config.json to start from (default: the tokenizer directory's)")
    p.add_argument("--size", choices=sorted(SIZES), help="widen the config to this size class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    build(args.tokenizer, args.out, args.config, args.size, args.seed)


if __name__ == "__main__":
    main()
