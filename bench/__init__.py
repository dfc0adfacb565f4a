"""swapserve benchmark harness: `python -m bench.run` (or `make bench`).

One run measures swapserve side by side with its anchors (HF `generate` on the base model, PEFT's mixed
batch, the seed's serial `set_adapter` flow) on the same machine, and reports ratios.

Modules:
    config.py    BenchConfig and the --quick / default / --full presets
    fixtures.py  the base model (the server's cached GGUF conversion) and the PEFT adapters made at bench time
                 (LoRA; IA3 / DoRA / AdaLoRA; cheap scaled copies for the scale run)
    timing.py    Trace (one request's token timestamps) and summarize() -> tok/s, TTFT, ITL
    anchors.py   the baselines: HF base batch, PEFT mixed batch, naive serial flow, PEFT load_adapter
    drivers.py   Driver protocol + EngineDriver (in-process AsyncEngine); run_concurrent()
    swap.py      adapter swap costs and load interference in swapserve
    scale.py     200 adapters on disk under Zipf traffic (own engine: 32 host / 16 device), IA3 + mixed-type cells
    memory.py    base-model RSS plain / int8 / nf4 (one subprocess each), bytes per adapter per tier
    report.py    results JSON, PNG chart, BENCHMARKS.md
    profile_step.py  profile one decode step (`python -m bench.profile_step`)
"""
