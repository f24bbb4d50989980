"""The web page for owners and the coordinator, served by ``flexmoe serve`` at ``/ui/``.

Server-rendered HTML from Jinja2 templates (``templates/``) with autoescaping, so that every
value a page shows is escaped without a call to forget; the usage charts are SVG laid out here,
and the only script (``static/ui.js``, served by flexmoe itself, no CDN) asks for a
confirmation before an opt-out or opt-in. An owner signs in with its owner token, the
coordinator with the admin token; the token is sent once, in the sign-in form, and the browser
then holds only a random session id in an HttpOnly, SameSite=Strict cookie that expires (the
sessions live in the server's memory, so a restart signs everyone out). Every form that
changes something carries the session's CSRF token.

What an owner sees and does is what the API lets it see and do: its own expert's facts, usage
and standing, and the opt-out and opt-in, through the same store and audit log as
``/v1/experts/NAME/opt-out``; the coordinator sees every slot, the router's version and who
shaped it, and the ledger as CSV. The headers forbid inline script, framing and referrers.
"""

from __future__ import annotations

import csv
import functools
import hmac
import io
import secrets
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs

import jinja2
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
Audit = tuple[str, str, str, str, str]  # time, expert, action, reason, actor


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


def _render(template: str, *, status: int = 200, **context: object) -> HTMLResponse:
    """``templates/TEMPLATE`` filled with ``context``; every value is escaped (autoescape)."""
    html = _templates().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


@functools.cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("flexmoe.serve", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


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
# The templates (templates/*.html) lay the pages out; the functions below gather plain values.


def error_page(status: int, message: str) -> HTMLResponse:
    """A refusal on the page: what went wrong, and the way back."""
    return _render(
        "message.html", status=status, title="Refused", heading=str(status), message=message
    )


def _sign_in_page(message: str = "", *, status: int = 200) -> HTMLResponse:
    return _render(
        "sign_in.html", status=status, title="Sign in", message=message, minutes=SESSION_S // 60
    )


@dataclass(frozen=True)
class _SlotRow:
    """What the pages show of one slot."""

    index: int
    name: str
    owner: str
    license: str
    signer: str  # the key's first 16 characters; "" when not signed
    epsilon: str  # "" without DP-SGD
    version: int
    opted_out: bool
    always_in: bool
    since: str
    by: str
    reason: str
    answers: int = 0
    tokens: float = 0.0


def _rows(
    statuses: list[ExpertStatus],
    versions: dict[str, int],
    audit: list[Audit],
    usage: dict[str, UsageRow],
) -> list[_SlotRow]:
    """Every slot as the pages show it: facts, standing and its latest change, usage."""
    changes = {name: (t, actor) for t, name, _, _, actor in audit}
    rows = []
    for st in statuses:
        slot, used = st.slot, usage.get(st.slot.name)
        since, by = changes.get(slot.name, (st.updated or "", ""))
        rows.append(
            _SlotRow(
                index=slot.index,
                name=slot.name,
                owner=slot.owner,
                license=slot.license,
                signer=slot.signer[:16] if slot.signer else "",
                epsilon=f"{slot.epsilon:.3g}" if slot.epsilon is not None else "",
                version=versions.get(slot.name, 1),
                opted_out=st.opted_out,
                always_in=slot.index == 0,
                since=since,
                by=by,
                reason=st.reason or "",
                answers=used.responses if used else 0,
                tokens=used.completion_tokens if used else 0.0,
            )
        )
    return rows


def _facts(model_dir: Path) -> tuple[SlotTable, list[ExpertStatus], dict[str, int], list[Audit]]:
    """The slot table, every slot's standing, each expert's slot version (federated rounds),
    and the audit log."""
    table = MergedModel.open(model_dir).table()
    versions = dict(table.federation.current_slots) if table.federation else {}
    with StandingStore(model_dir) as store:
        return table, store.statuses(), versions, store.audit()


def _chart(rows: list[UsageRow], *, what: str) -> dict[str, object]:
    """Per day, a bar of weighted completion tokens, laid out in a 640 x 180 box."""
    width, height, pad = 640, 180, 28
    top = max((r.completion_tokens for r in rows), default=0.0) or 1.0
    step = min((width - 2 * pad) / max(len(rows), 1), 48.0)  # few days stay narrow
    bars = []
    for i, r in enumerate(rows):
        h = (height - 2 * pad) * r.completion_tokens / top
        x = pad + i * step + step * 0.1
        bars.append(
            {
                "x": f"{x:.1f}",
                "y": f"{height - pad - h:.1f}",
                "width": f"{step * 0.8:.1f}",
                "h": f"{h:.1f}",
                "mid": f"{x + step * 0.4:.1f}",
                "day": r.key,
                "responses": r.responses,
                "tokens": f"{r.completion_tokens:.4f}",
                "label": f"{r.completion_tokens:.1f}",
            }
        )
    return {
        "width": width,
        "height": height,
        "pad": pad,
        "base": height - pad,
        "what": what,
        "bars": bars,
    }


def _owner_page(service: ExpertService, session: Session) -> HTMLResponse:
    expert = session.expert or ""
    _, statuses, versions, audit = _facts(service.model_dir)
    row = next((r for r in _rows(statuses, versions, audit, {}) if r.name == expert), None)
    if row is None:  # removed from the model since this session began
        return _sign_in_page(f"The expert {expert} is no longer in this model.", status=404)
    with Ledger(service.model_dir) as ledger:
        days = ledger.expert_days(expert)
        totals = ledger.expert_usage(expert)
        latest = ledger.latest(expert, LATEST)
    question = (
        f"Opt {expert} back in? The next answer may use it again."
        if row.opted_out
        else f"Opt {expert} out? From the next answer on, no answer uses it."
    )
    what = "tokens weighted by its share"
    return _render(
        "owner.html",
        title=f"{expert}'s owner",
        expert=expert,
        session=session,
        row=row,
        question=question,
        totals=totals,
        chart=_chart(days, what=what),
        days=days,
        latest=latest,
    )


def _router_line(table: SlotTable) -> str:
    """The router's version and who shaped it."""
    if table.federation is not None:
        current = table.federation.router_versions[table.federation.current_router]
        shaped = ", ".join(current.shaped_by) or "no owner's text"
        line = (
            f"version {current.version} (round {current.round}), shaped by {shaped}; "
            f"{len(table.federation.rounds)} federated rounds"
        )
    else:
        line = "as merged (no federated rounds)"
    if table.router_tuning is not None:
        line += f"; tuned after merging on {table.router_tuning.time}"
    return line


def _coordinator_page(service: ExpertService, session: Session) -> HTMLResponse:
    table, statuses, versions, audit = _facts(service.model_dir)
    with Ledger(service.model_dir) as ledger:
        days = ledger.expert_days(None)
        usage = {r.key: r for r in ledger.summary("expert")}
    rows = _rows(statuses, versions, audit, usage)
    owners: dict[str, float] = {}
    for row in rows:
        owners[row.owner] = owners.get(row.owner, 0.0) + row.tokens
    signatures = {None: "not asked (no key registry)", True: "required", False: "not required"}
    return _render(
        "coordinator.html",
        title="Coordinator",
        session=session,
        rows=rows,
        router=_router_line(table),
        signatures=signatures[table.signatures_required],
        owners=sorted(owners.items()),
        chart=_chart(days, what="generated tokens"),
        days=days,
        log=list(reversed(audit[-20:])),
    )
