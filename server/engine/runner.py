"""ModelRunner: owns the resident model, its wrapped adapter layers, the device slots and the paged KV cache,
and runs one forward over a step's flat token batch, returning the logits of the rows to sample."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from server.adapters.manager import AdapterManager
from server.config import EngineConfig
from server.engine.attention import PagedAttention, attention_kernel_choice, install
from server.engine.host_memory import keep_freed_heap, populate_in_background
from server.engine.kv_cache import PagedKVCache, budget_bytes
from server.engine.loader import is_quantized, load_model, pack_cpu_linears, settle_layout, usable_cores
from server.engine.request import Request
from server.engine.step_input import StepInput
from server.layers import lora_backend
from server.layers.inject import target_shapes, wrap_model
from server.layers.mapping import MappingHolder

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig):
        loaded = load_model(config)
        if loaded.device.type == "cpu":
            keep_freed_heap()
        if is_quantized(loaded.model):  # --quantization, or a checkpoint saved quantized
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
        self.holder.backend = lora_backend.choose(config.lora_kernel, config.lora_overlap, self.device, self.dtype,
                                                  torch.get_num_threads(), usable_cores())
        self.manager = AdapterManager(self.layers, self.holder, config.max_loras, self.device)
        self.max_len = min(config.max_model_len, self._model_max_len())
        if self.max_len < config.max_model_len:
            log.warning("--max-model-len %d is more than this model allows (%d positions): serving %d",
                        config.max_model_len, self.max_len, self.max_len)
        useful = 2 * config.max_num_seqs * self.max_len * PagedKVCache.block_bytes(self.model.config, 1, self.dtype)
        self.kv = PagedKVCache.for_model(self.model.config, budget_bytes(config.kv_cache_memory, self.device, useful),
                                         config.block_size, self.dtype, self.device)
        if self.device.type == "cpu":  # pages resident before the steps need them, not faulted in by first writes
            self.kv_resident = populate_in_background(self.kv.keys + self.kv.values, "KV cache pool")
        else:  # device memory: nothing to populate
            self.kv_resident = threading.Event()
            self.kv_resident.set()
        self.attention = PagedAttention(self.kv, attention_kernel_choice(config.attention_kernel, self.device,
                                                                         self.dtype))
        install(self.model, self.attention)
        self.backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        self.vocab_size = self.head.out_features
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens; --kv-cache-memory %s), prefix caching %s",
                 self.kv.num_blocks - 1, config.block_size, self.kv.nbytes / 2**20,
                 (self.kv.num_blocks - 1) * config.block_size, config.kv_cache_memory,
                 "on" if config.enable_prefix_caching else "off")

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
    def execute(self, seqs: list[tuple[Request, int]], weights) -> "StepOutput":
        """One forward over ``seqs`` (each request and how many tokens it computes from its
        ``num_computed_tokens``; its blocks already allocated). Returns the logits of the requests that reach
        their last token, and of the prompt rows whose logprobs were asked for."""
        step = StepInput.build(seqs, self.kv.block_size, self.device, self.attention.decode)
        self.manager.activate([[(u.key, u.scale) for u in r.active_uses] for r, _ in step.seqs],
                              [n for _, n in step.seqs], weights)
        self.attention.meta = step.attention
        try:
            out = self.backbone(input_ids=step.input_ids[None], position_ids=step.positions[None], use_cache=False)
        finally:
            self.manager.clear()
            self.attention.meta = None
        hidden = out.last_hidden_state[0]  # [T, hidden]
        logits = self.head(hidden.index_select(0, step.logit_rows)).float()  # [S + P, vocab]
        sampled = len(step.sampled)
        prompt, at = [], sampled
        for req, _, rows in step.prompt_rows:
            prompt.append((req, logits[at:at + rows]))
            at += rows
        return StepOutput(logits[:sampled], step.sampled, prompt)


@dataclass
class StepOutput:
    logits: torch.Tensor  # [S, vocab] float32, one row per sampled request
    sampled: list[Request]
    prompt: list[tuple[Request, torch.Tensor]]  # (request, [rows, vocab]) for its next prompt logprobs
