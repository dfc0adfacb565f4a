"""swapserve benchmark harness: `python -m bench.run` (or `make bench`).

One run measures swapserve side by side with its anchors (HF `generate` on the base model, PEFT's mixed
batch, the seed's serial `set_adapter` flow) on the same machine, and reports ratios.

Modules:
    config.py    BenchConfig and the --quick / default / --full presets
    fixtures.py  the base model (the server's cached GGUF conversion) and the PEFT adapters made at bench time
                 (LoRA; IA3 / DoRA / AdaLoRA; cheap scaled copies for the scale run)
    timing.py    Trace (one request's token timestamps) and summarize() -> tok/s, TTFT, ITL; SectionClock (each
                 section's wall and CPU time: results["section_seconds"], shown on the page)
    anchors.py   the baselines: HF base batch, PEFT mixed batch, naive serial flow, PEFT load_adapter, HF static
                 batches of mixed lengths
    drivers.py   Driver protocol + EngineDriver (in-process AsyncEngine); run_concurrent(), run_arrivals()
    swap.py      adapter swap costs and load interference in swapserve
    scale.py     200 adapters on disk under Zipf traffic (own engine: 32 host / 16 device), IA3 + mixed-type cells
    memory.py    base-model RSS plain / int8 / nf4 (one subprocess each), bytes per adapter per tier
    traffic.py   real traffic: one long prompt among short ones, a shared prefix, long-tailed lengths with Poisson
                 arrivals, 64 adapters vs base (`python -m bench.traffic` runs it on any checkout's server/)
    request_set.py  the traffic workloads' seeded prompts, lengths and arrival times
    probe.py     EngineProbe: KV high-water mark, preemptions and prefix hits during one run
    server_api.py   the engine API the traffic workloads use, for engine v1 and v2 alike
    baseline.py  the traffic workloads on another commit's server/ (git archive + a subprocess)
    report.py    results JSON, PNG chart, BENCHMARKS.md (markdown.py, traffic_markdown.py; numbers.py formats)
    profile_step.py  profile one decode step (`python -m bench.profile_step`)
"""
