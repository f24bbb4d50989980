"""The web page's screenshots (docs/img/ui-owner.png, ui-coordinator.png) from a finished demo run.

    python lab/experiments/screenshots.py RUN [--out docs/img] [--answers 12]

A copy of the run's merged model (the demo's corpora, owners and licences) is served on
127.0.0.1; ``--answers`` completions of the prompts below are asked, so that the ledger holds
real usage; then headless Chromium (Debian's, as the browser tests use) signs in as the legal
owner and as the coordinator and saves each page. Nothing in RUN changes.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from flexmoe.serve.app import create_app
from flexmoe.serve.auth import OwnerTokens
from flexmoe.serve.http import server_config

PROMPTS = (
    "Permission is hereby granted, free of charge,",
    "def read_config(path):",
    "It was a bright cold day in April, and",
    "hey, how was your weekend?",
    "THE SOFTWARE IS PROVIDED",
    "import os\nimport sys\n",
)
OWNER = "legal"
ADMIN = "admin-screenshots-" + "x" * 16


@contextmanager
def served(model: Path) -> Iterator[str]:
    app = create_app(model, device=torch.device("cpu"), admin_token=ADMIN, name="demo")
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=8765, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield "http://127.0.0.1:8765"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def shoot(browser: webdriver.Chrome, url: str, token: str, path: Path) -> None:
    browser.delete_all_cookies()
    browser.get(f"{url}/ui/")
    browser.find_element(By.ID, "token").send_keys(token)
    button = browser.find_element(By.CSS_SELECTOR, "form[action='/ui/sign-in'] button")
    button.click()
    WebDriverWait(browser, 30).until(expected_conditions.staleness_of(button))
    browser.find_element(By.TAG_NAME, "h1")
    browser.save_screenshot(str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `flexmoe-lab demo` run")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--answers", type=int, default=12)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as where:
        model = Path(shutil.copytree(args.run / "merged", Path(where) / "demo"))
        with OwnerTokens(model) as tokens:
            token = tokens.add(OWNER)
        with served(model) as url:
            for i in range(args.answers):
                body = {"model": "demo", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24}
                httpx.post(f"{url}/v1/completions", json=body, timeout=300).raise_for_status()
            browser = chromium()
            try:
                args.out.mkdir(parents=True, exist_ok=True)
                shoot(browser, url, token, args.out / "ui-owner.png")
                shoot(browser, url, ADMIN, args.out / "ui-coordinator.png")
            finally:
                browser.quit()


if __name__ == "__main__":
    main()
