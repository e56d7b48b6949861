"""Screenshots of every console page for docs/console/, from the demo story.

Seeds a fresh coordinator with :func:`cape_coordinator.console.demo.seed`, serves it on
127.0.0.1 in this process, and drives Debian's chromium through Playwright (no browser
download) as the person each page is for. Run it after changing a template:

    python scripts/console_screenshots.py            # writes docs/console/*.png
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from playwright.sync_api import sync_playwright

from cape_coordinator.app import create_app
from cape_coordinator.config import Paths, Settings
from cape_coordinator.console.demo import seed
from cape_coordinator.coordinator import Coordinator

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "console"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cape-shots-"))
    coord, _ = Coordinator.initialize(Paths.resolve(str(work / "cape.db")), Settings())
    tokens = seed(coord)
    server = uvicorn.Server(
        uvicorn.Config(create_app(coord), host="127.0.0.1", port=8699, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = "http://127.0.0.1:8699"
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            shots(browser, base, tokens)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
        coord.close()
    return 0


def page_for(browser: Any, base: str, token: str | None, width: int = 1280) -> Any:
    page = browser.new_context(viewport={"width": width, "height": 900}).new_page()
    if token:
        page.goto(base + "/ui/signin")
        page.get_by_label("API token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r".*/ui/home$"))
    return page


def snap(page: Any, base: str, path: str, name: str) -> None:
    page.goto(base + path)
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=True)
    print(f"docs/console/{name}.png  <- {path}")


def shots(browser: Any, base: str, tokens: dict[str, str]) -> None:
    page = page_for(browser, base, None)
    snap(page, base, "/ui/signin", "signin")
    page.context.close()

    rita = page_for(browser, base, tokens["rita"])
    snap(rita, base, "/ui/requests/new", "request-new")
    snap(rita, base, "/ui/requests", "requests")
    first = rita.locator("tbody tr a").last.get_attribute("href")
    snap(rita, base, first, "request")
    rita.context.close()

    alice = page_for(browser, base, tokens["alice"])
    snap(alice, base, "/ui/home", "home-author")
    request_id = first.rsplit("/", 1)[1]
    alice.goto(base + f"/ui/policies/new?request={request_id}")
    alice.get_by_label("Policy (YAML)").press("End")
    alice.locator("#check .ok, #check .error").first.wait_for()
    alice.screenshot(path=str(OUT / "editor.png"), full_page=True)
    print("docs/console/editor.png  <- /ui/policies/new")
    alice.context.close()

    bob = page_for(browser, base, tokens["bob"])
    snap(bob, base, "/ui/policies", "policies")
    snap(bob, base, "/ui/policies/orders/2", "review")
    snap(bob, base, "/ui/policies/customers/2", "review-approved")
    bob.context.close()

    phone = page_for(browser, base, tokens["bob"], width=390)
    snap(phone, base, "/ui/policies/orders/2", "review-phone")
    phone.context.close()

    carol = page_for(browser, base, tokens["carol"])
    snap(carol, base, "/ui/runs", "runs")
    run = carol.locator("tbody tr", has_text="succeeded").first.locator("a").get_attribute("href")
    snap(carol, base, run, "run")
    snap(carol, base, "/ui/audit", "audit")
    carol.context.close()

    admin = page_for(browser, base, tokens["demo-admin"])
    snap(admin, base, "/ui/admin/tokens", "tokens")
    snap(admin, base, "/ui/admin/keys", "keys")
    snap(admin, base, "/ui/policies/customers", "policy-label")
    admin.context.close()


if __name__ == "__main__":
    raise SystemExit(main())
