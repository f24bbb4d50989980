"""The OpenAI-compatible HTTP API over a merged model (FastAPI; install the ``serve`` extra).

Requests and responses follow OpenAI's completions and chat completions shapes, with two
additions: the request field ``experts`` (``{"include": [...]}``, ``{"exclude": [...]}``,
``{"licenses": [...]}``) and the response field ``attribution`` (expert -> share of the routing
mass over the generated tokens). Errors are OpenAI-style bodies with a 4xx status; the server
keeps serving.

Layers: ``protocol`` (request and error shapes, validated up front), ``limits`` (body size and
stalls, failed token attempts), this module (the routes), ``scheduler`` and ``batch`` (the
engine: batching, sampling, attribution), ``ledger`` and ``auth`` (what is recorded, who may
change what).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexmoe.errors import FlexMoEError
from flexmoe.inference.selection import Selection
from flexmoe.merge.layout import APPLY_BIAS, MergedModel
from flexmoe.merge.standing import StandingStore
from flexmoe.serve.auth import OwnerTokens, is_admin
from flexmoe.serve.batch import RowResult
from flexmoe.serve.ledger import Ledger
from flexmoe.serve.limits import MAX_BODY_BYTES, BodyLimit, FailureLimiter
from flexmoe.serve.protocol import (
    CHAT_STOP,
    ApiError,
    ChatRequest,
    CompletionRequest,
    OptRequest,
    Sampling,
    chat_prompt,
    error_response,
)
from flexmoe.serve.scheduler import Job, Scheduler

DISCONNECT_POLL_S = 0.25  # how often a waiting response checks that its client is still there


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
    merged = MergedModel.open(model_dir)
    model_dir = merged.path
    state: dict[str, ServerState] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = merged.load(use_bias=use_bias, device=device).eval()
        table = merged.table()
        slots = table.infos()
        tokenizer = merged.tokenizer()
        scheduler = Scheduler(model, tokenizer, model_dir, slots, device=device,
                              max_batch=max_batch)  # fmt: skip
        state["s"] = ServerState(
            model_dir=model_dir, name=name or model_dir.name, scheduler=scheduler,
            tokenizer=tokenizer, slots=slots, context=int(model.config.max_position_embeddings),
            admin_token=admin_token, tuned=table.router_tuning is not None,
        )  # fmt: skip
        app.state.scheduler = scheduler
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="flexmoe", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes, read_timeout_s=read_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def _httperror_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:  # e.g. invalid UTF-8
            message = "the request body is not valid JSON in UTF-8"
        return error_response(exc.status_code, message, None, kind)

    @app.exception_handler(ApiError)
    async def _apierror_response(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", None)
        if tuple(first.get("loc", ())) == ("body",):
            return error_response(400, "the request body must be a JSON object", None)
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_response(400, f"{where}: {message}" if where else message, where or None)

    @app.exception_handler(FlexMoEError)
    async def _flexmoeerror_response(request: Request, exc: FlexMoEError) -> JSONResponse:
        return error_response(400, exc.fault, exc.where)

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

    async def _job(body: Sampling, prompt: str, endpoint: str, stop: tuple[str, ...]) -> Job:
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
        token = _bearer(request)
        s = server()

        def owner_of() -> str | None:  # ~10 ms of scrypt per stored token: off the event loop
            tokens = OwnerTokens(s.model_dir)
            try:
                return tokens.owner_of(token)
            finally:
                tokens.close()

        limiter.begin(client)
        owner: str | None = None
        admin = is_admin(token, s.admin_token)
        try:
            if not admin:
                owner = await asyncio.to_thread(owner_of)
        finally:
            limiter.end(client, failed=not admin and owner is None)
        if admin:
            return "admin"
        if owner is None:
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
