"""KVCache growth: columns double on demand up to max_len, keeping what rows already hold."""
import torch

from server.engine.kv_cache import KVCache


def test_reserve_grows_by_doubling_and_keeps_the_prefix():
    kv = KVCache(num_layers=2, max_rows=3, kv_heads=2, head_dim=4, max_len=1000, dtype=torch.float32,
                 device=torch.device("cpu"))
    assert kv.columns == KVCache.INITIAL_COLUMNS and kv.max_nbytes == 2 * 2 * 3 * 2 * 1000 * 4 * 4
    before = [torch.randn_like(l.keys) for l in kv.layers]
    for layer, values in zip(kv.layers, before):
        layer.keys.copy_(values)
    kv.reserve(100)
    assert kv.columns == 256  # enough already: no copy
    kv.reserve(300)
    assert kv.columns == 512
    kv.reserve(900)
    assert kv.columns == 1000  # capped at max_len
    for layer, values in zip(kv.layers, before):
        assert torch.equal(layer.keys[:, :, :256], values)
        assert not layer.keys[:, :, 256:].any()
    assert kv.nbytes == kv.max_nbytes


def test_generation_across_a_growth_matches_peft(tiny_model_dir, adapters):
    """Rows decoding past the initial 256 columns keep their history: greedy tokens equal PEFT's."""
    from server.config import EngineConfig
    from server.engine.engine import LLMEngine
    from server.engine.request import Request, SamplingParams
    from support import peft_model_for

    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), max_loras=2, max_lora_rank=8, max_num_seqs=2,
                                 max_model_len=400, adapter_roots=[str(adapters["lora"].parent)]))
    prompt = [(7 * i) % 300 + 10 for i in range(250)]
    entry = eng.store.resolve("lora")
    eng.store.acquire(entry)
    eng.store.ensure_host(entry).result()
    req = Request("r", prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), "lora",
                  entry.version, entry)
    eng.scheduler.waiting.append(req)
    for _ in range(40):
        if not eng.scheduler.has_work:
            break
        eng.step()
    assert eng.runner.kv.columns == 400  # doubled, capped at max_model_len
    ref = peft_model_for(tiny_model_dir, adapters["lora"]).generate(
        torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(prompt):]
    assert req.output_token_ids == ref.tolist()
