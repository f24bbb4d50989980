"""The OpenAI-compatible HTTP API over a merged model (FastAPI; install the ``serve`` extra).

Requests and responses follow OpenAI's completions and chat completions shapes, with two
additions: the request field ``experts`` (``{"include": [...]}``, ``{"exclude": [...]}``,
``{"licenses": [...]}``) and the response field ``attribution`` (expert -> share of the routing
mass over the generated tokens). Errors are OpenAI-style bodies with a 4xx status; the server
keeps serving.

Layers: ``protocol`` (request, response and error shapes, validated up front), ``limits`` (body
size, stalls and read deadline, failed token attempts), ``http`` (malformed HTTP answered in the
API's shape), this module (the routes, a screen each), ``completions`` and ``experts`` (the
services the routes call), ``scheduler`` and ``batch`` (the engine: batching, sampling,
attribution), ``ledger`` and ``auth`` (what is recorded, who may change what).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexmoe.errors import FlexMoEError
from flexmoe.merge.layout import APPLY_BIAS, MergedModel
from flexmoe.serve.completions import CompletionService
from flexmoe.serve.experts import ExpertService, parse_opt_request
from flexmoe.serve.limits import MAX_BODY_BYTES, MAX_READ_S, BodyLimit
from flexmoe.serve.protocol import (
    CHAT_STOP,
    ApiError,
    ChatRequest,
    Completion,
    CompletionRequest,
    ExpertList,
    ExpertUsage,
    Health,
    ModelCard,
    ModelList,
    OptResponse,
    chat_prompt,
    error_response,
)
from flexmoe.serve.scheduler import Job, Scheduler
from flexmoe.serve.ui import SESSION_S, Sessions, error_page
from flexmoe.serve.ui import router as ui_router

router = APIRouter()


def create_app(
    model_dir: Path,
    *,
    device: torch.device,
    admin_token: str | None = None,
    max_batch: int = 8,
    name: str | None = None,
    use_bias: bool = APPLY_BIAS,
    max_body_bytes: int = MAX_BODY_BYTES,
    read_timeout_s: float = 10.0,
    read_deadline_s: float = MAX_READ_S,
    ui_session_s: float = SESSION_S,
) -> FastAPI:
    """The app for the merged model at ``model_dir``; the model loads when the app starts. The
    owners' and coordinator's page is at ``/ui/`` (:mod:`flexmoe.serve.ui`)."""
    merged = MergedModel.open(model_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = merged.load(use_bias=use_bias, device=device).eval()
        table = merged.table()
        slots, tokenizer = table.infos(), merged.tokenizer()
        scheduler = Scheduler(
            model, tokenizer, merged.path, slots, device=device, max_batch=max_batch
        )
        app.state.scheduler = scheduler
        app.state.completions = CompletionService(
            name=name or merged.path.name,
            scheduler=scheduler,
            tokenizer=tokenizer,
            slots=slots,
            context=int(model.config.max_position_embeddings),
        )
        app.state.experts = ExpertService(
            model_dir=merged.path,
            slots=slots,
            admin_token=admin_token,
            routing_tuned=table.router_tuning is not None,
        )
        try:
            yield
        finally:
            scheduler.close()

    app = FastAPI(title="flexmoe", lifespan=lifespan)
    app.add_middleware(
        BodyLimit, limit=max_body_bytes, read_timeout_s=read_timeout_s, deadline_s=read_deadline_s
    )
    app.state.ui_sessions = Sessions(ui_session_s)
    _error_handlers(app)
    app.include_router(router)
    app.include_router(ui_router)
    return app


def _completions(request: Request) -> CompletionService:
    return request.app.state.completions  # type: ignore[no-any-return]


def _experts(request: Request) -> ExpertService:
    return request.app.state.experts  # type: ignore[no-any-return]


@router.get("/health")
async def health(request: Request) -> Health:
    service = _completions(request)
    batches = service.scheduler.batches
    return Health(
        model=service.name,
        experts=len(service.slots),
        batches=len(batches),
        cancelled=len(service.scheduler.cancelled),
        largest_batch=max(batches, default=0),
    )


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    return ModelList(data=[ModelCard(id=_completions(request).name, created=int(time.time()))])


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Completion | StreamingResponse:
    service = _completions(request)
    job = await service.job(body, body.one_prompt(), chat=False, stop=tuple(body.stop or ()))
    return await _respond(service, job, request)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatRequest, request: Request) -> Completion | StreamingResponse:
    service = _completions(request)
    stop = (*(body.stop or ()), *CHAT_STOP)
    job = await service.job(body, chat_prompt(body.messages), chat=True, stop=stop)
    return await _respond(service, job, request)


async def _respond(
    service: CompletionService, job: Job, request: Request
) -> Completion | StreamingResponse:
    if job.stream:
        events = service.stream(job, request.is_disconnected)
        return StreamingResponse(events, media_type="text/event-stream")
    return await service.answer(job, request.is_disconnected)


@router.get("/v1/experts")
async def experts(request: Request) -> ExpertList:
    return _experts(request).list()


@router.post("/v1/experts/{expert}/opt-out")
async def opt_out(expert: str, request: Request) -> OptResponse:
    return await _set_standing(request, expert, opted_out=True)


@router.post("/v1/experts/{expert}/opt-in")
async def opt_in(expert: str, request: Request) -> OptResponse:
    return await _set_standing(request, expert, opted_out=False)


async def _set_standing(request: Request, expert: str, *, opted_out: bool) -> OptResponse:
    service = _experts(request)
    service.known(expert)
    client = request.client.host if request.client else "unknown"
    actor = await service.authorise(_bearer(request), client, expert)
    body = parse_opt_request(await request.body())
    return service.set(expert, opted_out=opted_out, body=body, actor=actor)


@router.get("/v1/experts/{expert}/usage")
async def usage(expert: str, request: Request) -> ExpertUsage:
    return _experts(request).usage(expert)


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing bearer token", kind="authentication_error")
    return token.strip()


def _error_handlers(app: FastAPI) -> None:
    """Every refusal as an OpenAI-style error body."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:  # e.g. invalid UTF-8
            message = "the request body is not valid JSON in UTF-8"
        return error_response(exc.status_code, message, None, kind)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        if request.url.path.startswith("/ui"):  # the page's refusals are pages too
            return error_page(exc.status, exc.message)
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", None)
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") != "value_error":
            return error_response(400, "the request body must be a JSON object", None)
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return error_response(400, f"{where}: {message}" if where else message, where or None)

    @app.exception_handler(FlexMoEError)
    async def flexmoe_error(request: Request, exc: FlexMoEError) -> JSONResponse:
        return error_response(400, exc.fault, exc.where)
