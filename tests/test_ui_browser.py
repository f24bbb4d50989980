"""The owners' and coordinator's page in a real browser: headless Chromium from Debian's packages
(``chromium``, ``chromium-driver``; ``make test`` installs them) driven by Selenium.

Where Chromium is missing these tests fail and say so; they never skip. With
``FLEXMOE_SCREENSHOTS=DIR`` they also save the owner's and the coordinator's page there, with
the tests' made-up owners; the README's screenshots come from a finished demo run instead
(``python lab/experiments/screenshots.py RUN``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import MARKUP
from helpers import ADMIN, live
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from flexmoe.merge.standing import StandingStore
from flexmoe.serve.auth import OwnerTokens
from flexmoe.serve.ledger import Ledger

NAME = "tiny"
PNG = b"\x89PNG\r\n\x1a\n"


def _browser() -> webdriver.Chrome:
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(
            "Chromium is not installed: `make test` installs Debian's chromium and "
            "chromium-driver with apt-get (it needs root or sudo)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1100", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    chrome = _browser()
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture
def model_dir(ui_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ui_model, tmp_path / NAME))


def _sign_in(browser: webdriver.Chrome, url: str, token: str) -> None:
    browser.delete_all_cookies()
    browser.get(f"{url}/ui/")
    browser.find_element(By.ID, "token").send_keys(token)
    button = browser.find_element(By.CSS_SELECTOR, "form[action='/ui/sign-in'] button")
    button.click()
    wait = WebDriverWait(browser, 30, ignored_exceptions=[StaleElementReferenceException])
    wait.until(expected_conditions.staleness_of(button))  # the sign-in page is gone
    wait.until(lambda page: page.find_element(By.TAG_NAME, "h1").text != "Sign in")


def _submit_standing(browser: webdriver.Chrome, reason: str, *, accept: bool) -> None:
    """Press the opt-out / opt-in button and answer the page's confirmation."""
    field = browser.find_element(By.ID, "reason")
    field.clear()
    field.send_keys(reason)
    browser.find_element(By.CSS_SELECTOR, "#standing button").click()
    alert = WebDriverWait(browser, 10).until(expected_conditions.alert_is_present())
    assert alert is not False
    assert "next answer" in alert.text
    if accept:
        alert.accept()
        WebDriverWait(browser, 30).until(expected_conditions.staleness_of(field))
    else:
        alert.dismiss()


def _shot(browser: webdriver.Chrome, where: Path, name: str) -> None:
    path = where / f"{name}.png"
    assert browser.save_screenshot(str(path)) and path.read_bytes().startswith(PNG)
    extra = os.environ.get("FLEXMOE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / f"ui-{name}.png")


def _share(url: str, expert: str) -> float:
    body = {"model": NAME, "prompt": "THE UNION", "max_tokens": 5, "min_tokens": 5}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return float(response.json()["attribution"][expert])


def test_an_owner_in_the_browser_reads_its_usage_opts_out_and_back_in(
    browser: webdriver.Chrome, model_dir: Path, tmp_path: Path
) -> None:
    with OwnerTokens(model_dir) as tokens:
        upper, again = tokens.add("upper"), tokens.add("again")
    with live(model_dir, name=NAME) as url:
        for _ in range(3):
            assert _share(url, "upper") > 0.0
        _sign_in(browser, url, upper)
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Your expert: upper")
        assert upper not in browser.current_url
        cookie = browser.get_cookie("flexmoe_ui")
        assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # script cannot read it
        assert browser.execute_script("return window.localStorage.length") == 0

        # the chart's numbers are the ledger's
        with Ledger(model_dir) as ledger:
            days = ledger.expert_days("upper")
            totals = ledger.expert_usage("upper")
        bars = browser.find_elements(By.CSS_SELECTOR, "#usage-chart rect.bar")
        assert [(b.get_attribute("data-day"), int(b.get_attribute("data-responses") or -1),
                 float(b.get_attribute("data-tokens") or -1)) for b in bars] == [
            (d.key, d.responses, pytest.approx(d.completion_tokens, abs=1e-4)) for d in days
        ]  # fmt: skip
        assert days[-1].responses == 3 and all(float(b.size["height"]) > 0 for b in bars)
        assert f"{totals.responses} of {totals.responses_total} answers used it" in (
            browser.find_element(By.ID, "totals").text
        )
        assert len(browser.find_elements(By.CSS_SELECTOR, "#latest tr")) == 1 + 3
        _shot(browser, tmp_path, "owner")

        _submit_standing(browser, "changed my mind", accept=False)  # no: nothing happens
        with StandingStore(model_dir) as store:
            assert store.opted_out() == frozenset()
        _submit_standing(browser, "the board said so", accept=True)
        assert "opted out" in browser.find_element(By.ID, "status").text
        assert _share(url, "upper") == 0.0  # the very next answer
        with StandingStore(model_dir) as store:
            assert store.audit()[-1][2:] == ("opt-out", "the board said so", "ui owner:upper")
        _submit_standing(browser, "", accept=True)
        assert browser.find_element(By.ID, "status").text.startswith("in")
        assert _share(url, "upper") > 0.0

        _sign_in(browser, url, again)  # another owner: nothing of the first
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Your expert: again")
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "upper" not in text and "the board said so" not in text
        assert MARKUP in text  # its own owner name, shown as text
        assert browser.execute_script("return document.querySelectorAll('img').length") == 0
        browser.get(f"{url}/ui/ledger.csv")
        assert "coordinator" in browser.find_element(By.TAG_NAME, "body").text


def test_the_coordinator_in_the_browser_sees_every_slot_and_no_markup_runs(
    browser: webdriver.Chrome, model_dir: Path, tmp_path: Path
) -> None:
    with live(model_dir, name=NAME) as url:
        _share(url, "upper")
        httpx.post(f"{url}/v1/experts/again/opt-out", headers={"Authorization": f"Bearer {ADMIN}"},
                   json={"reason": "<b id=bold>x</b><script>document.title='pwned'</script>"})  # fmt: skip
        _sign_in(browser, url, ADMIN)
        assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Coordinator")
        rows = browser.find_elements(By.CSS_SELECTOR, "#slots tr")[1:]
        cells = [[c.text for c in row.find_elements(By.TAG_NAME, "td")] for row in rows]
        assert [c[1] for c in cells] == ["public", "upper", "again"]
        assert cells[2][2] == MARKUP and cells[2][7].startswith("opted out")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018  (no alert(1) ran)
        assert browser.title == "Coordinator - flexmoe"
        found = "return document.querySelectorAll('img, script:not([src]), #bold').length"
        assert browser.execute_script(found) == 0
        assert "Package signatures: not asked" in browser.find_element(By.ID, "signatures").text
        assert (
            browser.find_element(By.ID, "ledger-csv")
            .get_attribute("href")
            .endswith("/ui/ledger.csv")
        )
        _shot(browser, tmp_path, "coordinator")
