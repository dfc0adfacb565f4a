"""Fixtures for adapter-format tests: a tiny random Llama and real PEFT adapters, built in tmp dirs at test time."""
from __future__ import annotations

import itertools

import pytest
import torch

TINY_LLAMA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))


@pytest.fixture
def make_adapter(tmp_path):
    """make_adapter(peft_config, save_embedding_layers="auto", **llama_overrides) -> (adapter dir, PeftModel).

    Trainable adapter tensors are re-drawn at random first: PEFT zero-initialises lora_B and lora_E, and a zero
    tensor would let a wrong product or transpose pass unnoticed.
    """
    from peft import get_peft_model

    counter = itertools.count()

    def make(peft_config, save_embedding_layers="auto", **llama_overrides):
        model = get_peft_model(tiny_llama(**llama_overrides), peft_config)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_()
        directory = tmp_path / f"adapter{next(counter)}"
        model.save_pretrained(directory, save_embedding_layers=save_embedding_layers)
        return directory, model

    return make


@pytest.fixture
def lora_dir(make_adapter):
    """A valid plain LoRA (r=4, alpha=8, q_proj+v_proj) for the hostile tests to corrupt one thing at a time."""
    from peft import LoraConfig

    directory, _ = make_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return directory


@pytest.fixture(scope="session")
def base_targets():
    """module path -> (in, out) of every layer the server wraps on the tiny Llama, as the runner computes it."""
    from server.layers.inject import target_shapes, wrap_model
    from server.layers.mapping import MappingHolder

    wrapped = wrap_model(tiny_llama(), MappingHolder(), num_slots=1, max_rank=8, dtype=torch.float32,
                         device=torch.device("cpu"))
    return target_shapes(wrapped)
