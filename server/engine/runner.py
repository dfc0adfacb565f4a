"""ModelRunner: owns the resident model, its wrapped adapter layers, the device slots and the KV cache, and
runs one forward (prefill or decode) for a set of rows, returning last-token logits."""
from __future__ import annotations

import logging

import torch

from server.adapters.manager import AdapterKey, AdapterManager
from server.config import EngineConfig
from server.engine.kv_cache import KVCache
from server.engine.loader import load_model, pack_cpu_linears, settle_layout
from server.layers import kernels
from server.layers.inject import target_shapes, wrap_model
from server.layers.mapping import MappingHolder

log = logging.getLogger(__name__)


def check_memory(need: int, device: torch.device) -> None:
    """Refuse to start when the KV cache at its ceiling could not fit: better now than mid-burst."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return
    if need > free:
        raise MemoryError(f"the KV cache needs up to {need / 2**30:.1f} GiB at --max-num-seqs x --max-model-len "
                          f"but only {free / 2**30:.1f} GiB is free on {device}; lower --max-num-seqs or --max-model-len")


def lora_kernel_max_run(choice: str, device: torch.device, dtype: torch.dtype) -> int:
    """The AdapterManager's ``max_run`` for --lora-kernel: kernels.max_run at this process's torch threads when
    the compiled CPU kernel is used (compiled here, before the first request), 0 for torch ops."""
    usable = device.type == "cpu" and dtype == torch.float32 and kernels.available()
    if choice == "numba" and not usable:
        raise ValueError("--lora-kernel numba needs float32 on CPU and the numba package "
                         f"(here: {dtype} on {device}, numba {'installed' if kernels.available() else 'missing'}); "
                         "use --lora-kernel auto or torch")
    if choice == "torch" or not usable:
        return 0
    kernels.warm_up()
    run = kernels.max_run(torch.get_num_threads())
    log.info("LoRA kernel: numba (compiled CPU loop) for steps with up to %d tokens per adapter (%d torch threads); "
             "torch ops for longer runs", run, torch.get_num_threads())
    return run


class ModelRunner:
    def __init__(self, config: EngineConfig):
        loaded = load_model(config)
        if config.quantization != "none":
            settle_layout(loaded.model, loaded.device)
        self.config = config
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.holder = MappingHolder()
        self.layers = wrap_model(self.model, self.holder, config.max_loras, config.max_lora_rank, self.dtype,
                                 self.device)
        self.targets = target_shapes(self.layers)
        pack_cpu_linears(self.model, config.cpu_gemm, self.device, self.dtype, config.quantization)
        self.head = self.model.get_output_embeddings()
        self.manager = AdapterManager(self.layers, self.holder, config.max_loras, self.device,
                                      max_run=lora_kernel_max_run(config.lora_kernel, self.device, self.dtype))
        self.max_len = min(config.max_model_len, self._model_max_len())
        self.kv = KVCache.for_model(self.model.config, config.max_num_seqs, self.max_len, self.dtype, self.device)
        check_memory(self.kv.max_nbytes, self.device)
        self.backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        self.vocab_size = self.head.out_features

    def _model_max_len(self) -> int:
        cfg = self.model.config.get_text_config()
        return getattr(cfg, "max_position_embeddings", None) or self.config.max_model_len

    def prepare_dora(self, weights) -> None:
        """Give a freshly loaded DoRA adapter its factors (they need this model's base weights) and pack it
        for the slot banks. Runs on the store's loader thread: ~0.2 s for SmolLM2, which on the step thread
        would stall every running stream at the adapter's first activation."""
        if not weights.use_dora:
            return
        for path, mw in weights.modules.items():
            if mw.magnitude is not None:
                self.layers[path].prepare_dora(mw)
        weights.prepare_slots(self.manager.layout)

    @property
    def slot_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for l in self.layers.values() for b in (l.lora_a, l.lora_b))

    @torch.inference_mode()
    def prefill(self, start: int, prompts: list[list[int]], row_keys: list[AdapterKey | None],
                weights) -> torch.Tensor:
        """Fresh rows [start, start+n) with their prompts (right-padded); returns logits [n, vocab] (float32)."""
        n, q_len = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((n, q_len), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        pos = torch.arange(q_len, device=self.device)
        mask = (pos[None, :] <= pos[:, None]).expand(n, 1, q_len, q_len)  # [n, 1, q, k] causal
        self.kv.reserve(q_len)
        self.kv.bind_prefill(start, start + n, q_len)
        self.manager.activate(row_keys, weights, q_len)
        hidden = self._forward(ids.to(self.device), mask, pos.expand(n, q_len))  # [n, q, hidden]
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        return self._logits(hidden[torch.arange(n, device=self.device), last])

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], row_keys: list[AdapterKey | None],
               weights) -> torch.Tensor:
        """Rows 0..n-1 each feed one token at its own position; returns logits [n, vocab] (float32)."""
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)  # [n]
        self.kv.reserve(max(positions) + 1)
        self.kv.bind_decode(pos)
        cols = torch.arange(self.kv.binding.kv_len, device=self.device)
        mask = (cols[None, :] <= pos[:, None])[:, None, None, :]  # [n, 1, 1, kv_len]
        self.manager.activate(row_keys, weights, 1)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        hidden = self._forward(ids, mask, pos[:, None])
        return self._logits(hidden[:, -1])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        try:
            out = self.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, cache=self.kv, use_cache=True)
        finally:
            self.manager.clear()
        return out.last_hidden_state

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()
