"""The anchors swapserve is measured against, in the same process and on the same weights:

    base   HF ``generate`` on the plain base model, batch N (no adapter work at all; stock torch linears)
    base_onednn   the same, its float32 CPU linears packed for oneDNN as swapserve's --cpu-gemm does: the
           ceiling for adapter serving at swapserve's GEMM (absent where --cpu-gemm auto would not pack)
    peft   PEFT's mixed batch: one ``generate`` over N rows with ``adapter_names=`` (k distinct adapters)
    naive  the seed's flow: requests one at a time, ``set_adapter`` + ``generate`` each (no batching)
    static_batches  HF's way with mixed lengths (the traffic section's request set): static batches in arrival
           order, left-padded, each run to its longest output

All run greedy with a fixed output length (``min_new_tokens == max_new_tokens``), and return Traces whose
token timestamps come from a StepClock inside ``generate``.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.fixtures import load_base
from bench.timing import StepClock, Trace, summarize
from server.engine.loader import pack_cpu_linears
from server.layers import gemm


class Anchors:
    """The plain base model and a PeftModel holding every cell adapter (loaded once, up front)."""

    def __init__(self, directory: Path, adapters: dict[str, Path], device: str = "cpu", dtype: str = "float32",
                 quantization: str = "none"):
        from peft import PeftModel

        self.device = torch.device(device)
        self.base = load_base(directory, device, dtype, quantization)
        self.base_onednn = None
        if gemm.plan("auto", self.device, getattr(torch, dtype)) is not None:
            self.base_onednn = load_base(directory, device, dtype, quantization)
            pack_cpu_linears(self.base_onednn, "auto", self.device, getattr(torch, dtype), quantization)
        names = list(adapters)
        self.peft = PeftModel.from_pretrained(load_base(directory, device, dtype, quantization), adapters[names[0]],
                                              adapter_name=names[0])
        for name in names[1:]:
            self.peft.load_adapter(adapters[name], adapter_name=name)
        self.peft.eval()
        self.pad = self.base.generation_config.eos_token_id
        if isinstance(self.pad, list):
            self.pad = self.pad[0]

    @torch.inference_mode()
    def _run(self, model, ids: torch.Tensor, mask: torch.Tensor, max_tokens: int, **kwargs) -> StepClock:
        """One greedy ``generate`` of exactly ``max_tokens`` tokens per row; ids, mask: [rows, width]."""
        clock = StepClock()
        model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens, do_sample=False, pad_token_id=self.pad, logits_processor=[clock],
                       **kwargs)
        return clock

    def _generate(self, model, prompts: list[list[int]], max_tokens: int, **kwargs) -> list[Trace]:
        ids = torch.tensor(prompts, dtype=torch.long)  # [rows, prompt_tokens], no padding
        sent = time.perf_counter()
        return self._run(model, ids, torch.ones_like(ids), max_tokens, **kwargs).traces(sent, len(prompts))

    def static_batches(self, model, prompts: list[list[int]], max_tokens: list[int], batch: int) -> list[Trace]:
        """Requests all there at time 0, served ``batch`` at a time in their order, as HF serves a static batch:
        left-padded to the batch's longest prompt, every row generating the batch's longest output. Request i's
        Trace counts from time 0 and keeps only its own first max_tokens[i] tokens."""
        sent = time.perf_counter()
        traces = []
        for start in range(0, len(prompts), batch):
            rows, wants = prompts[start:start + batch], max_tokens[start:start + batch]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), self.pad, dtype=torch.long)  # [rows, width], left-padded
            mask = torch.zeros_like(ids)
            for r, prompt in enumerate(rows):
                ids[r, width - len(prompt):] = torch.tensor(prompt)
                mask[r, width - len(prompt):] = 1
            times = self._run(model, ids, mask, max(wants)).times
            traces += [Trace(sent, times[:n], [1] * n) for n in wants]
        return traces

    def warm_up(self, prompt: list[int]) -> None:
        """One tiny generate on each path, so the first measured cell does not pay first-call costs."""
        self.base_batch([prompt], 2)
        if self.base_onednn is not None:
            self.base_onednn_batch([prompt], 2)
        self.peft_mixed([prompt], [self.peft.active_adapter], 2)

    def base_batch(self, prompts: list[list[int]], max_tokens: int) -> list[Trace]:
        return self._generate(self.base, prompts, max_tokens)

    def base_onednn_batch(self, prompts: list[list[int]], max_tokens: int) -> list[Trace]:
        return self._generate(self.base_onednn, prompts, max_tokens)

    def base_summaries(self, prompts: list[list[int]], max_tokens: int, stock: bool = True) -> dict:
        """The base-model anchors on ``prompts``, summarized: "base" (stock HF) and "base_onednn" (the linears
        packed as the server packs them, where that runs). ``stock`` False leaves stock HF out where the packed
        anchor runs (a later grid round); where it cannot run, stock HF is the only anchor and always runs."""
        out = {}
        if stock or self.base_onednn is None:
            out["base"] = summarize(self.base_batch(prompts, max_tokens))
        if self.base_onednn is not None:
            out["base_onednn"] = summarize(self.base_onednn_batch(prompts, max_tokens))
        return out

    def peft_mixed(self, prompts: list[list[int]], names: list[str], max_tokens: int) -> list[Trace]:
        """names: the adapter of each row (PEFT groups rows by adapter inside every LoRA layer)."""
        return self._generate(self.peft, prompts, max_tokens, adapter_names=names)

    def naive(self, prompts: list[list[int]], names: list[str], max_tokens: int) -> list[Trace]:
        """All requests arrive at once and are served one after another, so TTFT includes queueing."""
        sent = time.perf_counter()
        traces = []
        for prompt, name in zip(prompts, names):
            self.peft.set_adapter(name)
            trace = self._generate(self.peft, [prompt], max_tokens)[0]
            trace.sent = sent
            traces.append(trace)
        return traces

    def load_adapter_seconds(self, adapters: dict[str, Path]) -> list[float]:
        """PEFT ``load_adapter`` (read safetensors + inject LoRA modules) of fresh adapters, then delete them."""
        active = self.peft.active_adapter
        seconds = []
        for name, path in adapters.items():
            start = time.perf_counter()
            self.peft.load_adapter(path, adapter_name=f"peft-{name}")
            seconds.append(time.perf_counter() - start)
        for name in adapters:
            self.peft.delete_adapter(f"peft-{name}")
        self.peft.set_adapter(active)
        return seconds
