"""`python -m bench.run [--quick | --full] [--concurrency 1,8,32] [--adapters 1,4,16,64] ...`

Measures swapserve against its anchors in one process and writes bench/results/<preset>.json, a PNG chart
and BENCHMARKS.md. See bench/__init__.py for the layout and BENCHMARKS.md for what each number means.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: the bundled GGUF and adapters made here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> dict:
    from bench.config import parse_args, setup_logging
    from bench.report import cpu_probe, loadavg, stamp, write_outputs
    from bench.suite import run_suite
    from bench.timing import section_summary

    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    cfg = parse_args(argv)
    cfg.command = " ".join(["python -m bench.run", *argv])
    started = time.time()
    load_start, probe_start = loadavg(), cpu_probe()
    results = asyncio.run(run_suite(cfg))
    results = stamp({"model": _model_name(cfg), "config": cfg.to_dict(), "load_start": load_start,
                     "load_end": loadavg(), "cpu_gflops": {"start": probe_start, "end": cpu_probe()}, **results},
                    cfg.command, started)
    written = write_outputs(results, cfg)
    log = logging.getLogger("bench")
    log.info("done in %s (CPU in those sections: %.1f min)", section_summary(results["section_seconds"],
             time.time() - started), sum(results["section_cpu_seconds"].values()) / 60)
    log.info("load average at start %s, at end %s; wrote %s", results["load_start"], results["load_end"],
             ", ".join(v for v in written.values() if v))
    return results


def _model_name(cfg) -> str:
    from server.config import default_model

    return os.path.basename(cfg.model or default_model()).removesuffix(".gguf")


if __name__ == "__main__":
    main()
