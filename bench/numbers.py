"""How the report writes numbers: "–" for a missing value, ratios as "1.23x", sizes in MB, a median with
its range over rounds as "9.2 (9.0–9.5)". Shared by bench/markdown.py and bench/traffic_markdown.py."""
from __future__ import annotations


def fixed(value, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def times(value) -> str:
    return fixed(value, "{:.2f}x")


def megabytes(value) -> str:
    return "–" if value is None else f"{value / 1e6:.1f}"


def spread(mr: dict | None, fmt: str = "{:.1f}", suffix: str = "") -> str:
    """A bench.timing.median_range: "median (min–max)", or the median alone for one round or one value."""
    if not mr or mr.get("median") is None:
        return "–"
    text = fmt.format(mr["median"]) + suffix
    if mr.get("n", 1) > 1 and fmt.format(mr["min"]) != fmt.format(mr["max"]):
        text += f" ({fmt.format(mr['min'])}–{fmt.format(mr['max'])})"
    return text


def rounds_cells(runs: list[dict]) -> str:
    """Table cells for one system's rounds (bench.timing.summarize dicts): tok/s as median (min–max), then the
    medians of TTFT p50, TTFT p99, ITL p50 and ITL p99 in ms."""
    from statistics import median

    from bench.timing import median_range

    def med(key: str):
        xs = [r[key] for r in runs if r.get(key) is not None]
        return median(xs) if xs else None

    return " | ".join([spread(median_range([r.get("tok_s") for r in runs]))]
                      + [fixed(med(k)) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")])
