"""The console in headless Chromium (Debian's chromium, driven by Playwright): sign-in, the adapters page's
tiers against the admin API's, admin actions refused without the admin key and done with it, the playground's
side-by-side streams against the API's greedy outputs, the server page's charts, and no console errors.

Skipped when Playwright or a Chromium binary is missing (`make install` installs Playwright, `.ci/run`
chromium; set SWAPSERVE_CHROMIUM to use another binary)."""
from __future__ import annotations

import os
import re
import shutil

import pytest

from .conftest import ADMIN_KEY, API_KEY

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
CHROMIUM = os.environ.get("SWAPSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("no chromium binary (apt-get install chromium)", allow_module_level=True)

PROMPT = "The quick brown fox"
MAX_TOKENS = 12
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


class Console:
    """One page, with every console error and uncaught exception it logs."""

    def __init__(self, page, url: str):
        self.page, self.url = page, url
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.set_default_timeout(TIMEOUT_MS)

    def tier(self, name: str) -> str:
        return self.page.locator(f'#adapters-table tr[data-name="{name}"] [data-field="tier"]').inner_text()

    def row_action(self, name: str, action: str):
        return self.page.locator(f'#adapters-table tr[data-name="{name}"] button[data-action="{action}"]')

    def wait_for_tier(self, name: str, tier: str) -> None:
        tier_cell = self.page.locator(f'#adapters-table tr[data-name="{name}"] [data-field="tier"]')
        sync_api.expect(tier_cell).to_have_text(tier, timeout=TIMEOUT_MS)


def admin_listing(server) -> dict[str, dict]:
    with server.client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        return {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}


def greedy(server, choice: dict, chat: bool = False) -> str:
    """The API's greedy text for a column (``choice``: {"model": ...} or {"adapters": [...]})."""
    body = {**choice, "max_tokens": MAX_TOKENS, "temperature": 0}
    if chat:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    with server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        r = http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]


def test_console_end_to_end(auth_server, browser):
    console = Console(browser.new_page(viewport={"width": 1400, "height": 900}), auth_server.url)
    page = console.page
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url.removeprefix(auth_server.url)))
    page.goto(auth_server.url + "/")

    # signed out: the login form, and nothing else: no data route was even asked
    page.wait_for_selector("#login-form", state="visible")
    assert page.locator("#nav").is_hidden() and page.locator("#page-adapters").is_hidden()
    assert requested and all(path == "/" or path.startswith("/console/") for path in requested), requested
    page.fill("#login-key", API_KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-adapters", state="visible")

    # the adapters page: on-disk adapters before anything is loaded, the broken one with its reason
    console.wait_for_tier("gamma", "disk")
    console.wait_for_tier("alpha", "disk")
    assert "not valid JSON" in page.locator('tr[data-name="broken"] .tier').get_attribute("title")

    # an admin action without the admin key is refused, and nothing changes
    console.row_action("gamma", "load").click()
    page.wait_for_selector("#admin-status.error")
    assert "refused (401)" in page.inner_text("#admin-status")
    assert "gamma" not in admin_listing(auth_server)
    expected_errors = len(console.errors)  # the browser logs the refused request itself
    assert all("401" in e for e in console.errors)

    # with the admin key: load (a disk adapter, and one by path with pinned), pin, unload
    page.fill("#admin-key", ADMIN_KEY)
    page.keyboard.press("Enter")
    console.row_action("gamma", "load").click()
    console.wait_for_tier("gamma", "host")
    page.fill("#load-name", "beta2")
    page.fill("#load-path", "beta")
    page.check("#load-pinned")
    page.click("#load-form button[type=submit]")
    console.wait_for_tier("beta2", "host")
    assert admin_listing(auth_server)["beta2"]["pinned"] is True
    console.row_action("gamma", "pin").click()
    page.wait_for_selector('tr[data-name="gamma"] button[data-action="unpin"]')
    assert admin_listing(auth_server)["gamma"]["pinned"] is True
    console.row_action("beta2", "unload").click()
    page.wait_for_selector('tr[data-name="beta2"]', state="detached")
    assert "beta2" not in admin_listing(auth_server)

    # the playground: the base model, two adapters and a mixture of them in one go, streamed side by side
    page.focus('nav a[data-page="playground"]')  # the keyboard reaches every page
    page.keyboard.press("Enter")
    page.wait_for_selector("#page-playground", state="visible")
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    columns = {"tiny-llama": {"model": "tiny-llama"}, "alpha": {"model": "alpha"}, "gamma": {"model": "gamma"},
               "alpha*0.5 + gamma*-0.7": {"adapters": [{"name": "alpha", "scale": 0.5},
                                                       {"name": "gamma", "scale": -0.7}]}}
    page.click("#add-column")
    for i, spec in enumerate(columns):
        page.locator("#column-specs input").nth(i).fill(spec)
    page.click("#run")
    sync_api.expect(page.locator("#columns .column[data-state=done]")).to_have_count(4, timeout=TIMEOUT_MS)
    shown = page.locator("#columns .column pre").all_text_contents()
    assert shown == [greedy(auth_server, choice) for choice in columns.values()]
    assert shown[0] != shown[1] == shown[2] != shown[3]  # alpha and gamma are copies of one adapter

    # chat: the same columns through the chat template
    page.check('input[name="mode"][value="chat"]')
    page.click("#run")
    sync_api.expect(page.locator("#columns .column[data-state=done]")).to_have_count(4, timeout=TIMEOUT_MS)
    shown = page.locator("#columns .column pre").all_text_contents()
    assert shown == [greedy(auth_server, choice, chat=True) for choice in columns.values()]
    assert all("TTFT" in meta and "tok/s" in meta for meta in page.locator("#columns .meta").all_inner_texts())

    # both adapters ran, so both hold a device slot (max_loras 2): the page agrees with the admin API
    page.click('nav a[data-page="adapters"]')
    console.wait_for_tier("alpha", "device")
    console.wait_for_tier("gamma", "device")
    for name, entry in admin_listing(auth_server).items():
        assert console.tier(name) == entry["tier"], name
    tokens = page.locator('tr[data-name="gamma"] [data-field="tokens"]')
    sync_api.expect(tokens).to_have_text(re.compile(r"[1-9][0-9]+"), timeout=TIMEOUT_MS)
    assert int(tokens.inner_text()) >= MAX_TOKENS

    # the server page: every chart drawn, with its latest values in its label
    page.click('nav a[data-page="server"]')
    for chart in page.locator("canvas").all():
        sync_api.expect(chart).to_have_attribute("aria-label", re.compile(r"\d"), timeout=TIMEOUT_MS)
    assert "tiny-llama" in page.inner_text("#server-facts")

    assert console.errors[expected_errors:] == []
