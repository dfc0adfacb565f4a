"""Shared test helpers: a tiny random Llama (with a real offline-built tokenizer) and PEFT adapters of every kind.

Nothing is downloaded: the tokenizer is trained here on a few sentences, the model is random, and adapters
are created with PEFT and given random (non-zero) weights so every path changes the output.
"""
from __future__ import annotations

import copy

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU the Triton LoRA kernels run under Triton's interpreter (read when triton decorates a kernel, so
# before server.layers.lora_triton is imported); with one they compile for it as in production.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tiny models on 2 shared cores: one intra-op thread is several times faster than two (no OpenMP
# contention with other processes) and changes no result.
torch.set_num_threads(1)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Adapters are small; the base model is large. LoRA, DoRA, IA3 and AdaLoRA are adapter types.",
    "0123456789 hello world, héllo wörld, 你好世界, emoji 🙂 and more text for merges.",
] * 20


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init, so adapters and sampling have visible effects
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    return model


def per_token(rows, tokens_per_row):
    """The slot of each token of a flat batch of ``rows`` (one slot each), ``tokens_per_row`` tokens each."""
    import numpy as np

    return np.repeat(np.asarray(rows, dtype=np.int64), tokens_per_row)


ADAPTER_KINDS = ("lora", "rslora", "lora_pattern", "dora", "ia3", "adalora")


def peft_config(kind: str):
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    if kind == "lora":
        return LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    if kind == "rslora":
        return LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    if kind == "lora_pattern":
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj", "o_proj"],
                          rank_pattern={"k_proj": 2, "layers.1.self_attn.q_proj": 8},
                          alpha_pattern={"up_proj": 3})
    if kind == "dora":
        return LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"])
    if kind == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if kind == "adalora":
        return AdaLoraConfig(init_r=6, target_r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"],
                             total_step=10)
    raise ValueError(kind)


def adapter_root(adapters: dict[str, Path], root: Path, kinds: dict[str, str]) -> Path:
    """An adapter root at ``root`` holding, for each name -> kind of ``kinds``, a copy of ``adapters[kind]``."""
    import shutil

    for name, kind in kinds.items():
        shutil.copytree(adapters[kind], root / name)
    return root


def make_adapter(model_dir: Path, kind: str, out: Path, seed: int) -> Path:
    """Create a PEFT adapter of ``kind`` with random non-trivial weights and save it to ``out``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(base, peft_config(kind))
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


@torch.no_grad()
def randomize_adapter(peft_model, seed: int, scale: float = 0.2) -> None:
    """Give a fresh PEFT adapter random, non-trivial weights (PEFT initialises B/E to zero and IA3 to one,
    which would make every adapter a no-op and hide wrong math)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "ia3_l" in name:
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
        elif "lora_" in name:
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def peft_model_for(model_dir: Path, adapter_dir: Path | None, quantization: str = "none"):
    """The oracle: the base model (quantized like ours if asked) with PEFT's own adapter loading."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.engine.loader import _quantization_config

    quant = _quantization_config(quantization, torch.float32)
    kwargs = {"quantization_config": quant, "device_map": {"": "cpu"}} if quant else {}
    if quantization in ("nf4", "fp4"):
        _peft_dora_reads_packed_4bit()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa", **kwargs)
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir)
    return model.eval()


def peft_mixture_for(model_dir: Path, mix: list[tuple[Path, float]], quantization: str = "none"):
    """The mixture oracle: PEFT's add_weighted_adapter(adapter dirs, scales, "cat") on the base model, that
    adapter set. Components at scale 0 are left out (PEFT's cat would still add their zero rows); none left: the
    base model.

    PEFT's quirk: add_weighted_adapter copies ``use_rslora`` from the first adapter it is given into the mixture's
    config, so when that one is rsLoRA the mixture is scaled by sqrt(total rank) instead of 1. The sum is the
    same in any order, so the plain LoRAs go first; the stated semantics is y = W x + sum_i s_i dW_i x."""
    from peft import PeftModel

    mix = sorted([(Path(d), s) for d, s in mix if s != 0], key=lambda c: _uses_rslora(c[0]))
    base = peft_model_for(model_dir, None, quantization)
    if not mix:
        return base
    names = [f"c{i}" for i in range(len(mix))]
    model = PeftModel.from_pretrained(base, mix[0][0], adapter_name=names[0])
    for name, (directory, _) in zip(names[1:], mix[1:]):
        model.load_adapter(directory, adapter_name=name)
    model.add_weighted_adapter(names, [s for _, s in mix], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def _uses_rslora(adapter_dir: Path) -> bool:
    import json

    return bool(json.loads((adapter_dir / "adapter_config.json").read_text()).get("use_rslora"))


@torch.inference_mode()
def greedy_tokens(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens of ``model`` after ``prompt`` (full recompute each token), and their logprobs."""
    ids, tokens, logprobs = list(prompt), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        tokens.append(int(logits.argmax()))
        logprobs.append(float(torch.log_softmax(logits, -1)[tokens[-1]]))
        ids.append(tokens[-1])
    return tokens, logprobs


def _peft_dora_reads_packed_4bit() -> None:
    """Make the oracle right on CPUs with AVX512-BF16. There bitsandbytes repacks a Linear4bit's weight for its
    fused kernel at the layer's first forward, and PEFT 0.21's DoRA then dequantizes the repacked bytes as if
    they were not (dequantize_4bit(weight.data, quant_state)): PEFT's own DoRA logits come out ~0.3 off the
    math. PEFT's DoRA is taught the inverse bitsandbytes applies before saving, on a copy of the state; on
    other CPUs nothing is packed and this changes nothing."""
    import peft.tuners.lora.dora as dora

    original = getattr(dora.dequantize_module_weight, "__wrapped__", dora.dequantize_module_weight)

    def dequantize(module):
        w = module.weight
        state = getattr(w, "quant_state", None)
        if type(w).__name__ == "Params4bit" and getattr(state, "packing_format_for_cpu", False):
            import bitsandbytes as bnb

            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(state))
            if not state.nested:  # the inverse leaves plain block scales transposed, [K / blocksize, N]
                state.absmax = state.absmax.T.reshape(-1).to(state.dtype)
            return bnb.functional.dequantize_4bit(data, state)
        return original(module)

    dequantize.__wrapped__ = original
    dora.dequantize_module_weight = dequantize


def held(key) -> tuple:
    """AdapterUses for a key, a [(key, scale), ...] mixture or None, over stand-in entries (what the runner
    reads of a store entry: its key)."""
    from types import SimpleNamespace

    from server.engine.request import AdapterUse

    mix = [] if key is None else [(key, 1.0)] if isinstance(key, tuple) else key
    return tuple(AdapterUse(k[0], SimpleNamespace(key=k, info={}, content_hash=b""), c) for k, c in mix)


class Rows:
    """A ModelRunner driven by rows, the way the engine drives it: ``prefill`` starts sequences at row ``start``
    (their whole prompts in one step; rows from ``start`` on are replaced), ``decode`` feeds rows 0.. one token
    each. Every sequence holds its own KV blocks. Logits come back in the rows' order (the runner's flat batch
    puts decodes first, longest first)."""

    def __init__(self, runner, caching: bool = False):
        from server.engine.block_manager import BlockManager
        from server.engine.block_pool import BlockPool

        self.runner = runner
        self.blocks = BlockManager(BlockPool(runner.kv.num_blocks, caching), runner.kv.block_size)
        self.rows: list = []

    def prefill(self, start: int, prompts, keys, weights) -> torch.Tensor:
        """keys: per row, a device-slot key (adapter name, version), a mixture [(key, scale), ...], or None."""
        from server.engine.request import Request, SamplingParams

        for req in self.rows[start:]:
            self.blocks.free(req)
        fresh = [Request(f"row{start + i}", list(p), SamplingParams(), held(k))
                 for i, (p, k) in enumerate(zip(prompts, keys))]
        self.rows = self.rows[:start] + fresh
        return self.step([(r, len(r.prompt_token_ids)) for r in fresh], weights)

    def decode(self, tokens, weights) -> torch.Tensor:
        for req, token in zip(self.rows, tokens):
            req.output_token_ids.append(token)
        return self.step([(r, 1) for r in self.rows[:len(tokens)]], weights)

    def step(self, seqs, weights) -> torch.Tensor:
        """One forward over (request, new tokens) pairs; logits [len(seqs), vocab] in ``seqs`` order."""
        for req, n in seqs:
            assert self.blocks.allocate(req, n), "the test's KV cache is too small"
        out = self.runner.execute(seqs, weights)
        for req, n in seqs:
            req.num_computed_tokens += n
        row = {id(r): i for i, r in enumerate(out.sampled)}
        return out.logits[[row[id(r)] for r, _ in seqs]]


# ---- a scripted model: greedy output fixed by the last prompt token (tool-calling round trips) ----------------

TOOL_CALL_TEXT = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOL_ANSWER = "It is sunny in Paris."
TOOL_TEMPLATE = (
    "{% if tools %}<|system|>{{ tools | tojson }}</s>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|tool|>{{ m['content'] }}</s>"
    "{% elif m.get('tool_calls') %}<|assistant|>{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}"
    "</tool_call>{% endfor %}</s>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages[-1]['role'] == 'tool' %}<|answer|>{% else %}<|assistant|>"
    "{% endif %}{% endif %}"
)


def build_scripted_llama(out: Path):
    """A Llama whose next token depends only on the current one (a bigram table in lm_head, every layer's output
    projection zero, embeddings one-hot), with a tokenizer whose added tokens spell a Hermes tool call: after
    <|assistant|> it writes <tool_call>{...get_weather...}</tool_call></s>; after <|answer|> (the template's
    turn after a tool result) it writes the answer and </s>. Everything else leads to </s>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out)
    tok.add_tokens(["<tool_call>", "</tool_call>", TOOL_CALL_TEXT, TOOL_ANSWER])
    tok.add_special_tokens({"additional_special_tokens": ["<|answer|>", "<|tool|>"]})
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(out)
    vocab = len(tok)
    hidden = (vocab + 7) // 8 * 8
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ids = tok.convert_tokens_to_ids
    script = {"<|assistant|>": "<tool_call>", "<tool_call>": TOOL_CALL_TEXT, TOOL_CALL_TEXT: "</tool_call>",
              "<|answer|>": TOOL_ANSWER}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        head = model.lm_head.weight  # [vocab, hidden]: logits = head @ one-hot(current) * sqrt(hidden)
        head[2, :vocab] = 1.0  # default: </s>
        for cur, nxt in script.items():
            head[:, ids(cur)] = 0.0
            head[ids(nxt), ids(cur)] = 1.0
    model.save_pretrained(out)
    return tok


def distinct_copy(src: Path, dst: Path) -> Path:
    """A copy of the adapter ``src`` that is a version of its own: the same weights, its config's ``revision`` set
    to ``dst``'s name (PEFT reads it only to fetch base weights; it changes nothing computed). The server holds one
    copy per content, so tests that need N distinct loads need N distinct contents."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["revision"] = dst.name
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def fail_next_execute(runner, monkeypatch) -> None:
    """``runner``'s next execute (an engine step's forward) raises an injected internal error; later ones run."""
    real, failed = runner.execute, []

    def execute_once_failing(*args, **kwargs):
        if not failed:
            failed.append(1)
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", execute_once_failing)
