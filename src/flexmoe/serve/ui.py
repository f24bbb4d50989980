"""The web page for owners and the coordinator, served by ``flexmoe serve`` at ``/ui/``.

Plain server-rendered HTML; the usage charts are SVG drawn here, and the only script
(``static/ui.js``, served by flexmoe itself, no CDN) asks for a confirmation before an opt-out
or opt-in. An owner signs in with its owner token, the coordinator with the admin token; the
token is sent once, in the sign-in form, and the browser then holds only a random session id in
an HttpOnly, SameSite=Strict cookie that expires (the sessions live in the server's memory, so a
restart signs everyone out). Every form that changes something carries the session's CSRF token.

What an owner sees and does is what the API lets it see and do: its own expert's facts, usage
and standing, and the opt-out and opt-in, through the same store and audit log as
``/v1/experts/NAME/opt-out``; the coordinator sees every slot, the router's version and who
shaped it, and the ledger as CSV. Every piece of package text (expert names, owners, licences,
reasons) is escaped; the headers forbid inline script, framing and referrers.
"""

from __future__ import annotations

import csv
import hmac
import io
import secrets
import time
from dataclasses import dataclass
from html import escape
from importlib import resources
from typing import Literal
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import SlotTable
from flexmoe.merge.standing import ExpertStatus, StandingStore
from flexmoe.serve.experts import ExpertService
from flexmoe.serve.ledger import Ledger, UsageRow
from flexmoe.serve.protocol import ApiError, OptRequest

COOKIE = "flexmoe_ui"
SESSION_S = 30 * 60  # a session's life from sign-in
MAX_SESSIONS = 10_000
LATEST = 20  # answers shown with the expert's share
MAX_FORM_BYTES = 4096
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}

Role = Literal["owner", "admin"]


@dataclass(frozen=True)
class Session:
    role: Role
    expert: str | None  # the owner's expert; None for the coordinator
    csrf: str
    expires: float


class Sessions:
    """The signed-in browsers: random ids to sessions, in memory, each for ``lifetime_s``."""

    def __init__(self, lifetime_s: float = SESSION_S) -> None:
        self.lifetime_s = lifetime_s
        self._by_id: dict[str, Session] = {}

    def create(self, role: Role, expert: str | None) -> str:
        now = time.monotonic()
        self._by_id = {k: s for k, s in self._by_id.items() if s.expires > now}
        while len(self._by_id) >= MAX_SESSIONS:  # the oldest go first
            del self._by_id[next(iter(self._by_id))]
        sid = secrets.token_urlsafe(32)
        self._by_id[sid] = Session(role, expert, secrets.token_urlsafe(32), now + self.lifetime_s)
        return sid

    def get(self, sid: str | None) -> Session | None:
        session = self._by_id.get(sid or "")
        if session is None or session.expires <= time.monotonic():
            self._by_id.pop(sid or "", None)
            return None
        return session

    def drop(self, sid: str | None) -> None:
        self._by_id.pop(sid or "", None)


router = APIRouter()


def _service(request: Request) -> ExpertService:
    return request.app.state.experts  # type: ignore[no-any-return]


def _sessions(request: Request) -> Sessions:
    return request.app.state.ui_sessions  # type: ignore[no-any-return]


def _session(request: Request) -> Session | None:
    return _sessions(request).get(request.cookies.get(COOKIE))


def _page(body: str, *, title: str, status: int = 200) -> HTMLResponse:
    html = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)} - flexmoe</title>
<link rel="stylesheet" href="/ui/static/ui.css">
<script src="/ui/static/ui.js" defer></script>
</head>
<body>
<header><span class="brand">flexmoe</span> <span>{escape(title)}</span></header>
<main>
{body}
</main>
</body>
</html>
"""
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _redirect(to: str = "/ui/") -> RedirectResponse:
    return RedirectResponse(to, status_code=303, headers=HEADERS)


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (first value of each); anything else is refused."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise ApiError(415, "send the page's form (application/x-www-form-urlencoded)")
    raw = await request.body()
    if len(raw) > MAX_FORM_BYTES:
        raise ApiError(413, f"the form is larger than {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise ApiError(400, "the form is not UTF-8") from None
    return {k: v[0] for k, v in fields.items()}


def _checked(request: Request, form: dict[str, str]) -> Session | None:
    """The session a changing form comes from, if its CSRF token matches."""
    session = _session(request)
    if session is None:
        return None
    if not hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()):
        raise ApiError(403, "the form is stale or forged; reload the page", kind="permission_error")
    return session


# --- the routes --------------------------------------------------------------------------


@router.get("/ui", include_in_schema=False)
async def ui_root() -> RedirectResponse:
    return _redirect()


@router.get("/ui/", include_in_schema=False)
async def ui_home(request: Request) -> HTMLResponse:
    session = _session(request)
    if session is None:
        return _sign_in_page()
    service = _service(request)
    if session.role == "admin":
        return _coordinator_page(service, session)
    return _owner_page(service, session)


@router.post("/ui/sign-in", include_in_schema=False)
async def ui_sign_in(request: Request) -> Response:
    form = await _form(request)
    token = form.get("token", "").strip()
    client = request.client.host if request.client else "unknown"
    who = await _service(request).identify(token, client) if token else None
    if who is None:
        return _sign_in_page("That token is not valid (or it was revoked).", status=401)
    role: Role = "admin" if who == "admin" else "owner"
    expert = None if role == "admin" else who.removeprefix("owner:")
    sid = _sessions(request).create(role, expert)
    response = _redirect()
    response.set_cookie(
        COOKIE,
        sid,
        max_age=int(_sessions(request).lifetime_s),
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/ui/sign-out", include_in_schema=False)
async def ui_sign_out(request: Request) -> Response:
    form = await _form(request)
    if _checked(request, form) is not None:
        _sessions(request).drop(request.cookies.get(COOKIE))
    response = _redirect()
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


@router.post("/ui/experts/{expert}/{action}", include_in_schema=False)
async def ui_standing(expert: str, action: str, request: Request) -> Response:
    if action not in ("opt-out", "opt-in"):
        raise ApiError(404, "no such page")
    form = await _form(request)
    session = _checked(request, form)
    if session is None:
        return _sign_in_page("Your session has ended; sign in again.", status=401)
    service = _service(request)
    service.known(expert)
    if session.role != "admin" and session.expert != expert:
        raise ApiError(403, "you may change only your own expert", kind="permission_error")
    reason = form.get("reason", "")[:500]
    actor = "admin" if session.role == "admin" else f"owner:{session.expert}"
    service.set(
        expert,
        opted_out=action == "opt-out",
        body=OptRequest(reason=reason),
        actor=actor,
        via="ui",
    )
    return _redirect()


@router.get("/ui/ledger.csv", include_in_schema=False)
async def ui_ledger(request: Request) -> Response:
    session = _session(request)
    if session is None or session.role != "admin":
        raise ApiError(403, "the ledger is the coordinator's", kind="permission_error")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "response",
            "time",
            "endpoint",
            "prompt_tokens",
            "completion_tokens",
            "expert",
            "share",
            "weighted_tokens",
        ]
    )
    with Ledger(_service(request).model_dir) as ledger:
        for row in ledger.rows():
            writer.writerow([_cell(v) if isinstance(v, str) else v for v in row])
    headers = {**HEADERS, "Content-Disposition": 'attachment; filename="ledger.csv"'}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


@router.get("/ui/static/{name}", include_in_schema=False)
async def ui_static(name: str) -> Response:
    kind = STATIC.get(name)
    if kind is None:
        raise ApiError(404, "no such file")
    data = resources.files("flexmoe.serve").joinpath("static", name).read_bytes()
    headers = {k: v for k, v in HEADERS.items() if k != "Cache-Control"}
    return Response(data, media_type=kind, headers=headers)


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# --- the pages -----------------------------------------------------------------------------


def error_page(status: int, message: str) -> HTMLResponse:
    """A refusal on the page: what went wrong, and the way back."""
    body = f"""<h1>{status}</h1>
<p class="error" role="alert">{escape(message)}</p>
<p><a href="/ui/">Back</a></p>"""
    return _page(body, title="Refused", status=status)


def _sign_in_page(message: str = "", *, status: int = 200) -> HTMLResponse:
    note = f'<p class="error" role="alert">{escape(message)}</p>' if message else ""
    body = f"""<h1>Sign in</h1>
{note}
<form method="post" action="/ui/sign-in" class="card">
<label for="token">Your owner token (or the coordinator's admin token)</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<button type="submit">Sign in</button>
</form>
<p class="muted">The token is sent once; the page then keeps a session that ends after
{SESSION_S // 60} minutes.</p>"""
    return _page(body, title="Sign in", status=status)


def _csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(session.csrf)}">'


def _sign_out(session: Session) -> str:
    return f"""<form method="post" action="/ui/sign-out" class="inline">{_csrf_field(session)}
<button type="submit" class="link">Sign out</button></form>"""


def _facts(
    table: SlotTable, store: StandingStore
) -> tuple[list[ExpertStatus], dict[str, int], list[tuple[str, str, str, str, str]]]:
    """Every slot's standing, each expert's slot version (federated rounds), the audit log."""
    versions = dict(table.federation.current_slots) if table.federation else {}
    return store.statuses(), versions, store.audit()


def _changes(audit: list[tuple[str, str, str, str, str]]) -> dict[str, tuple[str, str]]:
    """Each expert's latest change: its time and actor."""
    return {name: (t, actor) for t, name, _, _, actor in audit}


def _status_cell(st: ExpertStatus, changes: dict[str, tuple[str, str]]) -> str:
    if st.slot.index == 0:
        return "always in"
    state = "opted out" if st.opted_out else "in"
    when, who = changes.get(st.slot.name, (st.updated or "", ""))
    since = f" since {escape(when)}" if when else ""
    by = f" by {escape(who)}" if who else ""
    reason = f" ({escape(st.reason)})" if st.reason else ""
    return (
        f'<span class="status {"out" if st.opted_out else "in"}">{state}</span>{since}{by}{reason}'
    )


def _fact_rows(st: ExpertStatus, versions: dict[str, int]) -> str:
    slot = st.slot
    signer = escape(slot.signer[:16]) if slot.signer else "not signed"
    epsilon = f"{slot.epsilon:.3g}" if slot.epsilon is not None else "no DP-SGD"
    version = str(versions.get(slot.name, 1))
    return (
        f"<tr><th>expert</th><td>{escape(slot.name)}</td></tr>"
        f"<tr><th>owner</th><td>{escape(slot.owner)}</td></tr>"
        f"<tr><th>licence</th><td>{escape(slot.license)}</td></tr>"
        f"<tr><th>signed by</th><td>{signer}</td></tr>"
        f"<tr><th>DP epsilon</th><td>{epsilon}</td></tr>"
        f"<tr><th>version</th><td>{version}</td></tr>"
    )


def _standing_form(st: ExpertStatus, session: Session) -> str:
    name = st.slot.name
    action = "opt-in" if st.opted_out else "opt-out"
    label = "Opt back in" if st.opted_out else "Opt out"
    question = (
        f"Opt {name} back in? The next answer may use it again."
        if st.opted_out
        else f"Opt {name} out? From the next answer on, no answer uses it."
    )
    return f"""<form method="post" action="/ui/experts/{escape(name)}/{action}" class="card"
 data-confirm="{escape(question)}" id="standing">
{_csrf_field(session)}
<label for="reason">Reason (kept in the audit log)</label>
<input id="reason" name="reason" maxlength="500">
<button type="submit" class="{"ok" if st.opted_out else "danger"}">{label}</button>
</form>"""


def _chart(rows: list[UsageRow], *, what: str) -> str:
    """Per day: a bar of weighted completion tokens; each bar carries its numbers."""
    if not rows:
        return '<p class="muted" id="no-usage">No answer has been recorded yet.</p>'
    width, height, pad = 640, 180, 28
    top = max(r.completion_tokens for r in rows) or 1.0
    step = min((width - 2 * pad) / len(rows), 48.0)  # a day's slot; few days stay narrow
    bars = []
    for i, r in enumerate(rows):
        h = (height - 2 * pad) * r.completion_tokens / top
        x, y = pad + i * step + step * 0.1, height - pad - h
        bars.append(
            f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{step * 0.8:.1f}" '
            f'height="{h:.1f}" data-day="{escape(r.key)}" data-responses="{r.responses}" '
            f'data-tokens="{r.completion_tokens:.4f}"><title>{escape(r.key)}: {r.responses} '
            f"answers, {r.completion_tokens:.1f} tokens</title></rect>"
            f'<text x="{x + step * 0.4:.1f}" y="{height - 8}" text-anchor="middle" '
            f'class="axis">{escape(r.key[5:])}</text>'
        )
    return (
        f'<svg id="usage-chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(what)} per day">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        f'class="axisline"/>{"".join(bars)}</svg>'
    )


def _day_table(rows: list[UsageRow], *, tokens: str) -> str:
    body = "".join(
        f"<tr><td>{escape(r.key)}</td><td>{r.responses}</td><td>{r.completion_tokens:.1f}</td></tr>"
        for r in rows
    )
    return (
        f'<table class="numbers" id="usage-days"><tr><th>day</th><th>answers</th>'
        f"<th>{escape(tokens)}</th></tr>{body}</table>"
    )


def _owner_page(service: ExpertService, session: Session) -> HTMLResponse:
    expert = session.expert or ""
    table = MergedModel.open(service.model_dir).table()
    with StandingStore(service.model_dir) as store:
        statuses, versions, audit = _facts(table, store)
    st = next((s for s in statuses if s.slot.name == expert), None)
    if st is None:  # removed from the model since this session began
        return _sign_in_page(f"The expert {expert} is no longer in this model.", status=404)
    changes = _changes(audit)
    with Ledger(service.model_dir) as ledger:
        days = ledger.expert_days(expert)
        totals = ledger.expert_usage(expert)
        latest = ledger.latest(expert, LATEST)
    answers = "".join(
        f"<tr><td>{escape(t)}</td><td>{escape(e)}</td><td>{c}</td><td>{s:.1%}</td></tr>"
        for t, e, c, s in latest
    )
    body = f"""<h1>Your expert: {escape(expert)} {_sign_out(session)}</h1>
<section class="card">
<h2>Facts</h2>
<table class="facts" id="facts">{_fact_rows(st, versions)}
<tr><th>status</th><td id="status">{_status_cell(st, changes)}</td></tr></table>
</section>
{_standing_form(st, session)}
<section class="card">
<h2>Usage</h2>
<p id="totals">{totals.responses} of {totals.responses_total} answers used it;
{totals.weighted_tokens:.1f} generated tokens weighted by its share; mean share
{totals.mean_share:.1%}.</p>
{_chart(days, what="tokens weighted by its share")}
{_day_table(days, tokens="tokens weighted by its share")}
</section>
<section class="card">
<h2>Its share in the latest answers</h2>
<table class="numbers" id="latest"><tr><th>time</th><th>endpoint</th><th>tokens</th>
<th>share</th></tr>{answers}</table>
</section>"""
    return _page(body, title=f"{expert}'s owner")


def _coordinator_page(service: ExpertService, session: Session) -> HTMLResponse:
    model = MergedModel.open(service.model_dir)
    table = model.table()
    with StandingStore(service.model_dir) as store:
        statuses, versions, audit = _facts(table, store)
    changes = _changes(audit)
    audit = audit[-20:]
    with Ledger(service.model_dir) as ledger:
        days = ledger.expert_days(None)
        per_expert = {r.key: r for r in ledger.summary("expert")}
    slots = "".join(
        f"<tr><td>{st.slot.index}</td><td>{escape(st.slot.name)}</td>"
        f"<td>{escape(st.slot.owner)}</td><td>{escape(st.slot.license)}</td>"
        f"<td>{escape(st.slot.signer[:16]) if st.slot.signer else '-'}</td>"
        f"<td>{f'{st.slot.epsilon:.3g}' if st.slot.epsilon is not None else '-'}</td>"
        f"<td>{versions.get(st.slot.name, 1)}</td><td>{_status_cell(st, changes)}</td>"
        f"<td>{per_expert[st.slot.name].responses if st.slot.name in per_expert else 0}</td>"
        f"<td>{per_expert[st.slot.name].completion_tokens if st.slot.name in per_expert else 0:.1f}"
        "</td></tr>"
        for st in statuses
    )
    owners: dict[str, float] = {}
    for st in statuses:
        row = per_expert.get(st.slot.name)
        owners[st.slot.owner] = owners.get(st.slot.owner, 0.0) + (
            row.completion_tokens if row else 0.0
        )
    owner_rows = "".join(
        f"<tr><td>{escape(o)}</td><td>{t:.1f}</td></tr>" for o, t in sorted(owners.items())
    )
    if table.federation is not None:
        current = table.federation.router_versions[table.federation.current_router]
        shaped = ", ".join(escape(n) for n in current.shaped_by) or "no owner's text"
        router = (
            f"version {current.version} (round {current.round}), shaped by {shaped}; "
            f"{len(table.federation.rounds)} federated rounds"
        )
    else:
        router = "as merged (no federated rounds)"
    if table.router_tuning is not None:
        router += f"; tuned after merging on {escape(table.router_tuning.time)}"
    signatures = {None: "not asked (no key registry)", True: "required", False: "not required"}[
        table.signatures_required
    ]
    log = "".join(
        f"<tr><td>{escape(t)}</td><td>{escape(n)}</td><td>{escape(a)}</td>"
        f"<td>{escape(w)}</td><td>{escape(r)}</td></tr>"
        for t, n, a, r, w in reversed(audit)
    )
    body = f"""<h1>Coordinator {_sign_out(session)}</h1>
<section class="card">
<h2>Every slot</h2>
<table class="numbers" id="slots"><tr><th>slot</th><th>expert</th><th>owner</th><th>licence</th>
<th>signed by</th><th>DP epsilon</th><th>version</th><th>status</th><th>answers</th>
<th>weighted tokens</th></tr>{slots}</table>
<p id="router">Router: {router}.</p>
<p id="signatures">Package signatures: {signatures}.</p>
<p><a href="/ui/ledger.csv" id="ledger-csv">Download the ledger (CSV)</a></p>
</section>
<section class="card">
<h2>Totals per owner</h2>
<table class="numbers" id="owners"><tr><th>owner</th><th>weighted tokens</th></tr>
{owner_rows}</table>
</section>
<section class="card">
<h2>Answers per day</h2>
{_chart(days, what="generated tokens")}
{_day_table(days, tokens="generated tokens")}
</section>
<section class="card">
<h2>Latest opt-outs and opt-ins</h2>
<table class="numbers" id="audit"><tr><th>time</th><th>expert</th><th>action</th><th>by</th>
<th>reason</th></tr>{log}</table>
</section>"""
    return _page(body, title="Coordinator")
