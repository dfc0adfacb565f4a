"""The LoRA backends on one layer at full size: the Triton kernels against the reference ops, same routes, same
slots; checks they agree and times each (CUDA events on a GPU). For bench/gpu.sh; on a CPU it runs the
kernels under Triton's interpreter with --tiny (a plumbing check, not a measurement).

    python -m bench.lora_kernels [--out FILE.json] [--tiny]

Cells: decode (one token per request, 32 requests over 16 adapters, and 64 over 64), a prefill of 2048 tokens
over 16 adapters, and a decode batch where every request mixes 2 adapters. Shapes: SmolLM2-135M's q_proj
(576 -> 576) and gate_proj (576 -> 1536) and a 1B-class model's (2048 -> 8192), rank 16, bf16.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from server.layers.lora_backend import TorchLora, TritonLora
from server.layers.mapping import MappingHolder, Routes
from server.layers.slot_bank import SlotBank

SHAPES = {"smollm2 q_proj": (576, 576), "smollm2 gate_proj": (576, 1536), "1b up_proj": (2048, 8192)}
CELLS = {  # name -> (tokens, adapters, tokens per request, adapters per token)
    "decode 32 x 16": (32, 16, 1, 1),
    "decode 64 x 64": (64, 64, 1, 1),
    "decode 32 x 16, 2-way mixtures": (32, 16, 1, 2),
    "prefill 2048 x 16": (2048, 16, 128, 1),
}


def routes_for(tokens: int, adapters: int, per_request: int, mix: int, rng) -> Routes:
    tok, slot, scale = [], [], []
    for request in range(tokens // per_request):
        chosen = rng.choice(adapters, size=mix, replace=False)
        for t in range(request * per_request, (request + 1) * per_request):
            for s in chosen:
                tok.append(t)
                slot.append(int(s))
                scale.append(1.0 if mix == 1 else 0.5)
    return Routes(np.array(tok), np.array(slot), np.array(scale, dtype=np.float64), tokens)


def layer_with_slots(inp: int, out: int, slots: int, rank: int, dtype, device):
    from torch import nn

    from server.layers.adapter_linear import AdapterLinear
    from server.layers.host_weights import ModuleWeights

    holder = MappingHolder()
    bank = SlotBank(1, inp, out, False, slots, rank, dtype, device)
    layer = AdapterLinear(nn.Linear(inp, out, bias=False, dtype=dtype, device=device), holder, slots, rank,
                          dtype, device, bank=bank)
    bank.paths.append("model.layers.0.mlp.down_proj")
    gen = torch.Generator(device="cpu").manual_seed(0)
    for slot in range(slots):  # through the bank, the one writer of slot state
        bank.fill_layers(slot, [ModuleWeights(a=(torch.randn(rank, inp, generator=gen) / inp ** 0.5).to(dtype),
                                              b=(torch.randn(out, rank, generator=gen) / rank ** 0.5).to(dtype))])
    return layer, holder


def timed_ms(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1e3 * (time.perf_counter() - began) / repeats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="")
    p.add_argument("--tiny", action="store_true", help="small shapes and cells (CPU, interpreter)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {"tiny": (32, 48)} if args.tiny else SHAPES
    cells = {"decode 8 x 4": (8, 4, 1, 1), "prefill 40 x 4, 2-way": (40, 4, 10, 2)} if args.tiny else CELLS
    repeats = 1 if args.tiny else args.repeats
    rng = np.random.default_rng(0)
    results = []
    for shape_name, (inp, out) in shapes.items():
        for cell, (tokens, adapters, per_request, mix) in cells.items():
            routes = routes_for(tokens, adapters, per_request, mix, rng)
            layer, holder = layer_with_slots(inp, out, adapters, 16, dtype, device)
            x = torch.randn(tokens, inp, device=device, dtype=dtype)
            row = {"shape": shape_name, "cell": cell, "dtype": str(dtype).removeprefix("torch.")}
            outputs = {}
            for backend in (TorchLora(), TritonLora()):
                holder.backend = backend
                mapping = backend.plan(routes, adapters, device)

                def run(backend=backend, mapping=mapping):
                    y = torch.zeros(tokens, out, device=device, dtype=dtype)
                    backend.add(layer, y, x, mapping)
                    return y

                outputs[backend.name] = run().float()
                row[f"{backend.name}_ms"] = round(timed_ms(run, device, repeats), 4)
            diff = (outputs["triton"] - outputs["reference"]).abs().max().item()
            row["max_abs_diff"] = diff
            row["scale"] = outputs["reference"].abs().max().item()
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
