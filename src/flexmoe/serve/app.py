"""The OpenAI-compatible HTTP API over a merged model (FastAPI; install the ``serve`` extra).

Requests and responses follow OpenAI's completions and chat completions shapes, with two
additions: the request field ``experts`` (``{"include": [...]}``, ``{"exclude": [...]}``,
``{"licenses": [...]}``) and the response field ``attribution`` (expert -> share of the routing
mass over the generated tokens). Errors are OpenAI-style bodies with a 4xx status; the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexMoEError
from flexmoe.inference.selection import Selection
from flexmoe.io import read_json
from flexmoe.merge.build import APPLY_BIAS, SLOTS_FILE, load_merged
from flexmoe.merge.slots import read_slots
from flexmoe.merge.standing import StandingStore
from flexmoe.serve.auth import OwnerTokens, is_admin
from flexmoe.serve.batch import RowResult
from flexmoe.serve.ledger import Ledger
from flexmoe.serve.scheduler import Job, Scheduler

MAX_STOP = 4
CHAT_STOP = ("\nUser:", "\nSystem:")
DISCONNECT_POLL_S = 0.25  # how often a waiting response checks that its client is still there
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before parsing
MAX_SEED = 2**63 - 1  # what torch's generator takes
MIN_TEMPERATURE = 1e-6  # below it (and above 0) logits / temperature overflow float32
MIN_TOP_P = float(torch.finfo(torch.float32).tiny)  # the least top_p float32 holds above 0


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code
        )  # fmt: skip


def _error(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
    code: str | None = None,
) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class ExpertChoice(BaseModel):
    """The extra request field: which experts may answer this request."""

    model_config = ConfigDict(extra="forbid")
    include: list[str] | None = None
    exclude: list[str] | None = None
    licenses: list[str] | None = None

    @field_validator("include", "licenses")
    @classmethod
    def _not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:  # an empty allow-list selects nothing, never all
            raise ValueError("an empty allow-list selects no expert; leave it out for all")
        return value

    def selection(self) -> Selection:
        return Selection(
            include=frozenset(self.include or ()), exclude=frozenset(self.exclude or ()),
            licenses=frozenset(self.licenses or ()),
        )  # fmt: skip


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # other OpenAI fields are accepted and ignored
    model: str | None = None
    max_tokens: int = Field(default=16, ge=1)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end-of-text before this
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    experts: ExpertChoice | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings")
        for stop in stops:
            _unicode(stop)
        return stops

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float) -> float:
        if value < MIN_TOP_P:
            raise ValueError(f"must be at least {MIN_TOP_P:.3g} (float32's least positive)")
        return value


def _unicode(text: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates), else a ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return text


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            value = value[0]
        return _unicode(value)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        return _unicode(value)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain template for base models: ``Role: content`` lines, then ``Assistant:``."""
    lines = [f"{m.role.capitalize()}: {m.content.strip()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class OptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before anything parses
    it, whether its length is declared or it arrives in chunks; a body whose next chunk takes
    longer than ``read_timeout_s`` gets a 408 (a slow-drip client is cut off). Reading stops
    there, and whatever the app answers to the cut body is replaced by the refusal."""

    def __init__(self, app: Any, limit: int, read_timeout_s: float = 10.0) -> None:
        self.app, self.limit, self.read_timeout_s = app, limit, read_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, 413)
            return
        seen, refusal, complete = 0, 0, False
        cut = {"type": "http.request", "body": b"", "more_body": False}

        async def counted() -> Any:
            nonlocal seen, refusal, complete
            if refusal:
                return cut
            if complete:  # after the body: only a disconnect can come, wait as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                refusal = 408
                return cut
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    refusal = 413
                    return cut
            return message

        async def answered(message: Any) -> None:
            if not refusal:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(send, refusal)

        await self.app(scope, counted, answered)

    async def _refuse(self, send: Any, status: int) -> None:
        message = (
            f"the request body is larger than {self.limit:,} bytes"
            if status == 413
            else f"the request body stalled for over {self.read_timeout_s:g} s"
        )
        response = _error(status, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": response.raw_headers})  # fmt: skip
        await send({"type": "http.response.body", "body": response.body})


class FailureLimiter:
    """Failed token attempts per client address: at most ``limit`` in any ``window_s`` seconds;
    past that the client gets 429 until the oldest failure ages out. Memory stays bounded: at
    most ``max_clients`` addresses are tracked (the stalest dropped first)."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self.failures: dict[str, collections.deque[float]] = {}

    def _recent(self, client: str, now: float) -> collections.deque[float]:
        times = self.failures.get(client, collections.deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def check(self, client: str) -> None:
        now = time.monotonic()
        times = self._recent(client, now)
        if len(times) >= self.limit:
            wait = int(self.window_s - (now - times[0])) + 1
            raise ApiError(429, f"too many failed token attempts; retry in {wait} s",
                           kind="rate_limit_error", code="rate_limit_exceeded")  # fmt: skip

    def failed(self, client: str) -> None:
        now = time.monotonic()
        times = self._recent(client, now)
        times.append(now)
        self.failures.pop(client, None)
        self.failures[client] = times  # the most recent failures last
        while len(self.failures) > self.max_clients:
            self.failures.pop(next(iter(self.failures)))


@dataclass
class ServerState:
    model_dir: Path
    name: str
    scheduler: Scheduler
    tokenizer: Any
    slots: list[Any]
    context: int
    admin_token: str | None
    tuned: bool


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token", kind="authentication_error")
    return token.strip()


def create_app(
    model_dir: Path, *, device: torch.device, admin_token: str | None = None,
    max_batch: int = 8, name: str | None = None, use_bias: bool = APPLY_BIAS,
    max_body_bytes: int = MAX_BODY_BYTES, read_timeout_s: float = 10.0,
) -> FastAPI:  # fmt: skip
    """The app for the merged model at ``model_dir``; the model loads when the app starts."""
    model_dir = Path(model_dir)
    if not (model_dir / SLOTS_FILE).is_file():
        raise FlexMoEError(model_dir, "not a merged model (no flexmoe_slots.json)")
    state: dict[str, ServerState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = load_merged(model_dir, use_bias=use_bias, device=device).eval()
        slots = read_slots(model_dir)
        tokenizer = load_tokenizer(model_dir)
        table = read_json(model_dir / SLOTS_FILE)
        scheduler = Scheduler(model, tokenizer, model_dir, slots, device=device,
                              max_batch=max_batch)  # fmt: skip
        state["s"] = ServerState(
            model_dir=model_dir, name=name or model_dir.name, scheduler=scheduler,
            tokenizer=tokenizer, slots=slots, context=int(model.config.max_position_embeddings),
            admin_token=admin_token, tuned=bool(table.get("router_tuning")),
        )  # fmt: skip
        app.state.scheduler = scheduler
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="flexmoe", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes, read_timeout_s=read_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:  # e.g. invalid UTF-8
            message = "the request body is not valid JSON in UTF-8"
        return _error(exc.status_code, message, None, kind)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return _error(400, "the request body is not valid JSON", None)
        if tuple(first.get("loc", ())) == ("body",):
            return _error(400, "the request body must be a JSON object", None)
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return _error(400, f"{where}: {message}" if where else message, where or None)

    @app.exception_handler(FlexMoEError)
    async def _flexmoe_error(request: Request, exc: FlexMoEError) -> JSONResponse:
        return _error(400, exc.fault, exc.where)

    def server() -> ServerState:
        return state["s"]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = server()
        return {"status": "ok", "model": s.name, "experts": len(s.slots),
                "batches": len(s.scheduler.batches), "cancelled": len(s.scheduler.cancelled),
                "largest_batch": max(s.scheduler.batches, default=0)}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        s = server()
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": int(time.time()), "owned_by": "flexmoe"}
        ]}  # fmt: skip

    async def _job(body: _Sampling, prompt: str, endpoint: str, stop: tuple[str, ...]) -> Job:
        s = server()
        if body.model is not None and body.model != s.name:
            raise ApiError(404, f"model {body.model!r} is not served here (serving {s.name!r})",
                           param="model", code="model_not_found")  # fmt: skip
        selection = body.experts.selection() if body.experts else Selection()
        try:  # unknown names, or nothing left: a 400 before queueing
            selection.mask(s.slots)
        except FlexMoEError as e:
            raise ApiError(400, e.fault, param="experts") from None
        encoded = await asyncio.to_thread(  # off the event loop: /health stays fast
            lambda: s.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        ids = [s.tokenizer.eos_token_id, *encoded]
        if len(ids) + body.max_tokens > s.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens "
                                f"({body.max_tokens}) exceed the context of {s.context} tokens",
                           param="max_tokens", code="context_length_exceeded")  # fmt: skip
        return Job(
            request_id=f"{'chatcmpl' if 'chat' in endpoint else 'cmpl'}-{uuid.uuid4().hex}",
            endpoint=endpoint, prompt_ids=ids, selection=selection, max_tokens=body.max_tokens,
            min_tokens=min(body.min_tokens, body.max_tokens),
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
            stream=body.stream, loop=asyncio.get_running_loop(),
        )  # fmt: skip

    def _attribution(result: RowResult) -> dict[str, float]:
        return {slot.name: round(share, 6) for slot, share in
                zip(server().slots, result.shares, strict=True)}  # fmt: skip

    def _usage(result: RowResult) -> dict[str, int]:
        done = len(result.token_ids)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": done,
                "total_tokens": result.prompt_tokens + done}  # fmt: skip

    async def _event(job: Job, request: Request) -> tuple[str, Any]:
        """The job's next event; a client that has gone meanwhile cancels the job (its row
        stops at the next token and is not billed) and ends the response."""
        getter = asyncio.ensure_future(job.events.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()  # type: ignore[no-any-return]
            if await request.is_disconnected():
                getter.cancel()
                job.cancelled.set()
                raise asyncio.CancelledError

    async def _finish(job: Job, request: Request) -> RowResult:
        while True:
            kind, value = await _event(job, request)
            if kind == "done":
                return value  # type: ignore[no-any-return]
            if kind == "error":
                raise ApiError(500, str(value), kind="server_error")

    def _chunk(
        job: Job, chat: bool, text: str | None, result: RowResult | None, first: bool = False
    ) -> str:
        s = server()
        if chat:
            delta = {"content": text} if text is not None else {}
            if first:
                delta = {"role": "assistant", "content": ""}
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "finish_reason": result.finish_reason if result else None,
            }
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": result.finish_reason if result else None}  # fmt: skip
        body: dict[str, Any] = {
            "id": job.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": s.name, "choices": [choice],
        }  # fmt: skip
        if result is not None:
            body["attribution"] = _attribution(result)
            body["usage"] = _usage(result)
        return f"data: {json.dumps(body)}\n\n"

    async def _stream(job: Job, chat: bool, request: Request) -> AsyncIterator[str]:
        finished = False
        try:
            if chat:
                yield _chunk(job, chat, None, None, first=True)
            while True:
                kind, value = await _event(job, request)
                if kind == "text":
                    yield _chunk(job, chat, value, None)
                elif kind == "done":
                    yield _chunk(job, chat, None, value)
                    break
                else:
                    error = {"error": {"message": str(value), "type": "server_error"}}
                    yield f"data: {json.dumps(error)}\n\n"
                    break
            yield "data: [DONE]\n\n"
            finished = True
        finally:  # the client went away mid-stream: its row stops at the next token
            if not finished:
                job.cancelled.set()

    async def _respond(job: Job, chat: bool, request: Request) -> Any:
        server().scheduler.submit(job)
        if job.stream:
            return StreamingResponse(_stream(job, chat, request), media_type="text/event-stream")
        result = await _finish(job, request)
        if chat:
            choice: dict[str, Any] = {
                "index": 0, "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason, "logprobs": None,
            }  # fmt: skip
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason,
                      "logprobs": None}  # fmt: skip
        return {
            "id": job.request_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": server().name, "choices": [choice],
            "usage": _usage(result), "attribution": _attribution(result),
        }  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        stop = tuple(body.stop or ())  # type: ignore[arg-type]
        job = await _job(body, str(body.prompt), "completions", stop)
        return await _respond(job, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        stop = (*(body.stop or ()), *CHAT_STOP)  # type: ignore[misc]
        job = await _job(body, chat_prompt(body.messages), "chat.completions", tuple(stop))
        return await _respond(job, chat=True, request=request)

    @app.get("/v1/experts")
    async def experts() -> dict[str, Any]:
        s = server()
        store = StandingStore(s.model_dir)
        try:
            statuses = store.statuses()
        finally:
            store.close()
        data = [
            {"name": st.slot.name, "owner": st.slot.owner, "license": st.slot.license,
             "slot": st.slot.index, "public": st.slot.index == 0,
             "status": "opted-out" if st.opted_out else "active", "reason": st.reason,
             "updated": st.updated, "routing_tuned": s.tuned}
            for st in statuses
        ]  # fmt: skip
        return {"object": "list", "data": data}

    def _known(expert: str, *, changeable: bool = True) -> None:
        """404 for a name the model lacks; 400 for the public expert where a change is asked."""
        names = [slot.name for slot in server().slots]
        if expert not in names:
            raise ApiError(404, f"no expert {expert!r} in this model", param="name",
                           code="expert_not_found")  # fmt: skip
        if changeable and expert == names[0]:
            raise ApiError(400, "the public expert is always active", param="name")

    limiter = FailureLimiter()

    async def _authorise(request: Request, expert: str) -> str:
        client = request.client.host if request.client else "unknown"
        limiter.check(client)
        token = _bearer(request)
        s = server()
        if is_admin(token, s.admin_token):
            return "admin"

        def owner_of() -> str | None:  # ~10 ms of scrypt per stored token: off the event loop
            tokens = OwnerTokens(s.model_dir)
            try:
                return tokens.owner_of(token)
            finally:
                tokens.close()

        owner = await asyncio.to_thread(owner_of)
        if owner is None:
            limiter.failed(client)
            raise ApiError(401, "the token is not valid", kind="authentication_error")
        if owner != expert:
            raise ApiError(403, f"this token belongs to the {owner} expert's owner, not {expert}'s",
                           kind="permission_error")  # fmt: skip
        return f"owner:{owner}"

    async def _set(request: Request, expert: str, opted_out: bool) -> dict[str, Any]:
        _known(expert)
        actor = await _authorise(request, expert)
        raw = await request.body()
        try:
            body = OptRequest.model_validate_json(raw) if raw.strip() else OptRequest()
        except ValueError:
            raise ApiError(400, 'the body must be {"reason": "..."} (at most 500 characters)',
                           param="reason") from None  # fmt: skip
        store = StandingStore(server().model_dir)
        try:
            store.set(expert, opted_out=opted_out, reason=body.reason, actor=f"api {actor}")
        finally:
            store.close()
        return {"name": expert, "status": "opted-out" if opted_out else "active"}

    @app.post("/v1/experts/{expert}/opt-out")
    async def opt_out(expert: str, request: Request) -> dict[str, Any]:
        return await _set(request, expert, True)

    @app.post("/v1/experts/{expert}/opt-in")
    async def opt_in(expert: str, request: Request) -> dict[str, Any]:
        return await _set(request, expert, False)

    @app.get("/v1/experts/{expert}/usage")
    async def usage(expert: str) -> dict[str, Any]:
        _known(expert, changeable=False)
        ledger = Ledger(server().model_dir)
        try:
            return {"name": expert, **ledger.expert_usage(expert)}
        finally:
            ledger.close()

    return app
