"""Take the README's console screenshots (docs/console-*.png): a real server on the default model
(SmolLM2-135M-Instruct) with random PEFT adapters of four kinds, driven in headless Chromium.

    .venv/bin/python docs/screenshots.py [--model DIR_OR_GGUF] [--out docs] [--chromium /usr/bin/chromium]

Needs Playwright (the test extra) and Debian's chromium. Adapters are built once under --work (random weights,
small enough that the model stays fluent, large enough that each column differs).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repository's server/ and bench/

from bench.fixtures import make_typed_adapters, model_dir  # noqa: E402
from server.api.app import create_app  # noqa: E402
from server.api.settings import ServerConfig  # noqa: E402
from server.config import EngineConfig  # noqa: E402
from server.engine.async_engine import AsyncEngine  # noqa: E402

KINDS = {"french-lora": "lora", "terse-dora": "dora", "style-ia3": "ia3", "summary-adalora": "adalora",
         "legal-lora": "lora", "poetry-lora": "lora"}
PROMPT = "Explain in two sentences why the sky is blue."


def build_adapters(work: Path, model: str, cache_dir: str) -> Path:
    root = work / "adapters"
    if not all((root / name / "adapter_model.safetensors").is_file() for name in KINDS):
        root.mkdir(parents=True, exist_ok=True)
        make_typed_adapters(model_dir(model, cache_dir), KINDS, root, rank=8, seed=7)
    return root


def serve(config: EngineConfig, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    app = create_app(AsyncEngine(config), ServerConfig(port=port, shutdown_timeout=5))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.1)
    return server, thread


def traffic(url: str, stop: threading.Event) -> None:
    """Background requests over several adapters, so the charts and the per-adapter counts have something."""
    models = [None, "french-lora", "legal-lora", "summary-adalora"]
    with httpx.Client(base_url=url, timeout=120) as http:
        i = 0
        while not stop.is_set():
            body = {"prompt": f"Write a haiku about the number {i}.", "max_tokens": 24, "temperature": 0.8}
            if models[i % len(models)]:
                body["model"] = models[i % len(models)]
            try:
                http.post("/v1/completions", json=body)
            except httpx.HTTPError:  # the server is stopping
                return
            i += 1


def shoot(url: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
        page.set_default_timeout(180_000)
        page.goto(url + "/#playground")
        page.wait_for_selector("#page-playground", state="visible")
        page.check('input[name="mode"][value="chat"]')
        page.fill("#prompt", PROMPT)
        page.fill("#max-tokens", "48")
        page.click("#add-column")
        for i, spec in enumerate(["", "french-lora", "terse-dora", "french-lora*0.6 + poetry-lora*0.4"]):
            if spec:
                page.locator("#column-specs input").nth(i).fill(spec)
        page.click("#run")
        expect(page.locator("#columns .column[data-state=done]")).to_have_count(4, timeout=180_000)
        page.screenshot(path=str(out / "console-playground.png"), full_page=True)

        page.click('nav a[data-page="adapters"]')
        expect(page.locator('tr[data-name="terse-dora"] [data-field="tier"]')).to_have_text("device")
        page.screenshot(path=str(out / "console-adapters.png"), full_page=True)

        page.click('nav a[data-page="server"]')
        time.sleep(40)  # a few polls of history with the background traffic running
        page.screenshot(path=str(out / "console-server.png"), full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="base model (default: the server's default, SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/swapserve-screenshots"),
                        help="scratch directory for the generated adapters (reused between runs)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary Playwright drives")
    parser.add_argument("--port", type=int, default=8765, help="loopback port for the server")
    args = parser.parse_args()
    probe = EngineConfig(model=args.model) if args.model else EngineConfig()
    root = build_adapters(args.work, probe.model, probe.cache_dir)
    config = EngineConfig(**({"model": args.model} if args.model else {}), adapter_roots=[str(root)],
                          max_loras=4, max_cpu_loras=6, lora_modules={"legal-lora": str(root / "legal-lora")})
    server, thread = serve(config, args.port)
    url = f"http://127.0.0.1:{args.port}"
    with httpx.Client(base_url=url, timeout=600) as http:
        while http.get("/ready").status_code != 200:
            time.sleep(0.5)
    with httpx.Client(base_url=url, timeout=600) as http:  # on-demand loads first: the columns show steady state
        for name in ("french-lora", "terse-dora", "poetry-lora"):
            http.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 1})
    stop = threading.Event()
    threading.Thread(target=traffic, args=(url, stop), daemon=True).start()
    try:
        shoot(url, args.out, args.chromium)
    finally:
        stop.set()
        server.should_exit = True  # the lifespan stops the engine; exit after it, not with its threads mid-step
        thread.join(60)


if __name__ == "__main__":
    main()
