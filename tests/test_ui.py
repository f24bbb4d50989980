"""The owners' and coordinator's page at /ui/ over HTTP: sessions, CSRF, one owner's view only,
the same opt-out as the API, the ledger as CSV, escaping and security headers. The same page in
a real browser: tests/test_ui_browser.py."""

from __future__ import annotations

import csv
import io
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from helpers import ADMIN, live

from flexmoe.expert.spec import ExpertIdentity
from flexmoe.merge.standing import StandingStore
from flexmoe.serve.auth import OwnerTokens
from flexmoe.serve.ledger import Ledger

NAME = "tiny"


@pytest.fixture
def model_dir(ui_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ui_model, tmp_path / NAME))


def owner_tokens(model_dir: Path) -> tuple[str, str]:
    with OwnerTokens(model_dir) as store:
        return store.add("upper"), store.add("again")


def sign_in(url: str, token: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    response = client.post("/ui/sign-in", data={"token": token})
    assert response.status_code == 303, response.text
    return client


def csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def ask(url: str, prompt: str = "THE UNION") -> dict[str, float]:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 5, "min_tokens": 5}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return dict(response.json()["attribution"])


def test_an_owner_signs_in_sees_only_its_expert_and_opts_out_as_the_api_does(
    model_dir: Path,
) -> None:
    upper, again = owner_tokens(model_dir)
    with live(model_dir, name=NAME) as url:
        first = httpx.get(f"{url}/ui/")
        assert first.status_code == 200 and "Sign in" in first.text
        policy = first.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert first.headers["referrer-policy"] == "no-referrer"
        assert first.headers["x-frame-options"] == "DENY"
        assert re.findall(r"<script[^>]*>", first.text) == [
            '<script src="/ui/static/ui.js" defer>'
        ]  # no inline script
        wrong = httpx.post(f"{url}/ui/sign-in", data={"token": upper + "x"})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        assert "set-cookie" not in wrong.headers

        owner = httpx.Client(base_url=url, timeout=60)
        signed = owner.post("/ui/sign-in", data={"token": upper})
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/"
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert "Max-Age=1800" in cookie and upper not in cookie
        page = owner.get("/ui/").text
        assert "Your expert: upper" in page and "upper org" in page
        assert "again" not in page and "onerror" not in page  # nothing of the other owner
        for answer in range(2):
            ask(url, f"THE UNION {answer}")
        with Ledger(model_dir) as ledger:
            days = ledger.expert_days("upper")
        assert days and days[-1].responses == 2  # both answers used it
        page = owner.get("/ui/").text
        bars = re.findall(r'data-day="([^"]+)" data-responses="(\d+)" data-tokens="([^"]+)"', page)
        assert bars == [(d.key, str(d.responses), f"{d.completion_tokens:.4f}") for d in days]

        out = "/ui/experts/upper/opt-out"
        for form in ({"reason": "no csrf"}, {"csrf": "forged", "reason": "x"}):
            refused = owner.post(out, data=form)
            assert refused.status_code == 403 and "text/html" in refused.headers["content-type"]
        theirs = owner.post("/ui/experts/again/opt-out", data={"csrf": csrf(page)})
        assert theirs.status_code == 403
        with StandingStore(model_dir) as store:
            assert store.opted_out() == frozenset()  # nothing changed so far
        done = owner.post(out, data={"csrf": csrf(page), "reason": "board said so"})
        assert done.status_code == 303
        with StandingStore(model_dir) as store:
            assert store.opted_out() == {"upper"}
            assert store.audit()[-1][1:] == ("upper", "opt-out", "board said so", "ui owner:upper")
        assert ask(url)["upper"] == 0.0  # the very next answer
        page = owner.get("/ui/").text
        assert "opted out" in page and "board said so" in page and "Opt back in" in page
        back = owner.post("/ui/experts/upper/opt-in", data={"csrf": csrf(page)})
        assert back.status_code == 303 and ask(url)["upper"] > 0.0

        stranger = sign_in(url, again)
        theirs_page = stranger.get("/ui/").text
        assert "Your expert: again" in theirs_page and "board said so" not in theirs_page
        assert "upper org" not in theirs_page
        assert stranger.get("/ui/ledger.csv").status_code == 403  # the coordinator's only
        signed_out = owner.post("/ui/sign-out", data={"csrf": csrf(page)})
        assert signed_out.status_code == 303
        assert "Sign in" in owner.get("/ui/").text


def test_sessions_expire_and_the_coordinator_sees_every_slot_and_the_ledger(
    model_dir: Path,
) -> None:
    upper, _ = owner_tokens(model_dir)
    with live(model_dir, name=NAME, ui_session_s=2.0) as url:
        owner = sign_in(url, upper)
        page = owner.get("/ui/").text
        time.sleep(2.2)
        assert "Sign in" in owner.get("/ui/").text  # expired: the sign-in page
        late = owner.post("/ui/experts/upper/opt-out", data={"csrf": csrf(page)})
        assert late.status_code == 401 and "session has ended" in late.text
        with StandingStore(model_dir) as store:
            assert store.opted_out() == frozenset()

    with live(model_dir, name=NAME) as url:
        ask(url)
        httpx.post(
            f"{url}/v1/experts/again/opt-out",
            headers={"Authorization": f"Bearer {ADMIN}"},
            json={"reason": "<script>alert('reason')</script>"},
        )
        admin = sign_in(url, ADMIN)
        page = admin.get("/ui/").text
        assert "Coordinator" in page and "upper org" in page
        assert "Package signatures: not asked" in page
        assert "Router: as merged (no federated rounds)" in page
        for slot in ("public", "upper", "again"):
            assert f"<td>{slot}</td>" in page
        # package text and reasons are escaped, never markup
        assert "&lt;img src=x onerror=alert(1)&gt; &amp; co" in page
        assert "<img" not in page and "<script>alert" not in page
        assert "&lt;script&gt;alert(&#39;reason&#39;)&lt;/script&gt;" in page  # markupsafe's escape
        ledger = admin.get("/ui/ledger.csv")
        assert ledger.status_code == 200 and "attachment" in ledger.headers["content-disposition"]
        rows = list(csv.reader(io.StringIO(ledger.text)))
        with Ledger(model_dir) as store:
            expected = store.rows()
        assert rows[0][:3] == ["response", "time", "endpoint"] and len(rows) == len(expected) + 1
        assert {r[5] for r in rows[1:]} <= {"public", "upper", "again"}
        static = httpx.get(f"{url}/ui/static/ui.js")
        assert static.status_code == 200 and "confirm" in static.text
        assert httpx.get(f"{url}/ui/static/../app.py").status_code == 404
        assert httpx.get(f"{url}/ui/static/secret.py").status_code == 404


@pytest.mark.parametrize("name", ["<b>x</b>", "a<svg/onload=alert(1)>", 'x"y', "o'k"])
def test_an_expert_name_cannot_carry_markup_into_the_page(name: str) -> None:
    """Names are checked when a package is made, so markup never reaches a slot; owners may
    hold it (the pages escape it: the tests above and the browser tests)."""
    from flexmoe.errors import FlexMoEError

    with pytest.raises(FlexMoEError, match=r"use ASCII letters|path separators"):
        ExpertIdentity(name=name, owner="an owner", license="MIT")
