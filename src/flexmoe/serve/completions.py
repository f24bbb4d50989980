"""The completions service: a request becomes a job for the batching worker, and the worker's
events become an OpenAI-shaped answer, whole or streamed, with its attribution."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from flexmoe.errors import FlexMoEError
from flexmoe.inference.selection import Selection
from flexmoe.merge.slots import SlotInfo
from flexmoe.serve.batch import RowResult, TokenLogprob
from flexmoe.serve.protocol import (
    ApiError,
    ChatChoice,
    ChatChunkChoice,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatRequest,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Sampling,
    TopLogprob,
    Usage,
)
from flexmoe.serve.scheduler import Job, Scheduler

DISCONNECT_POLL_S = 0.25  # how often a waiting response checks that its client is still there
Disconnected = Callable[[], Awaitable[bool]]  # whether the client has gone


@dataclass
class CompletionService:
    """Completions and chat completions of one served model."""

    name: str
    scheduler: Scheduler
    tokenizer: PreTrainedTokenizerBase
    slots: list[SlotInfo]
    context: int  # the model's context length in tokens

    async def job(
        self, body: Sampling, prompt: str | list[int], *, chat: bool, stop: tuple[str, ...]
    ) -> Job:
        """The request as a job, every refusal (model, experts, length) raised before queueing.
        A text prompt is tokenised after an end-of-text (the start of a document, as in
        training); token ids are taken as given."""
        if body.model is not None and body.model != self.name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here (serving {self.name!r})",
                param="model",
                code="model_not_found",
            )
        selection = body.experts.selection() if body.experts else Selection()
        try:  # unknown names, or nothing left
            selection.mask(self.slots)
        except FlexMoEError as e:
            raise ApiError(400, e.fault, param="experts") from None
        ids = await self._prompt_ids(prompt)
        if len(ids) + body.max_tokens > self.context:
            raise ApiError(
                400,
                f"the prompt ({len(ids)} tokens) plus max_tokens ({body.max_tokens}) exceed "
                f"the context of {self.context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return Job(
            request_id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            endpoint="chat.completions" if chat else "completions",
            prompt_ids=ids,
            selection=selection,
            max_tokens=body.max_tokens,
            min_tokens=min(body.min_tokens, body.max_tokens),
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=stop,
            stream=body.stream,
            loop=asyncio.get_running_loop(),
            logprobs=_wanted_logprobs(body),
            echo_from=(0 if isinstance(prompt, list) else 1)
            if getattr(body, "echo", False)
            else None,
        )

    async def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            vocab = len(self.tokenizer)
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is not in the vocabulary", param="prompt")
            return list(prompt)
        encoded = await asyncio.to_thread(  # off the event loop: /health stays fast
            lambda: self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        )
        return [self.tokenizer.eos_token_id, *encoded]

    async def answer(self, job: Job, gone: Disconnected) -> Completion:
        """Run ``job`` and wait for its whole answer; a client that leaves cancels it."""
        self.scheduler.submit(job)
        while True:
            kind, value = await _event(job, gone)
            if kind == "done":
                return self._completion(job, value)
            if kind == "error":
                raise ApiError(500, str(value), kind="server_error")

    async def stream(self, job: Job, gone: Disconnected) -> AsyncIterator[str]:
        """Run ``job`` and yield its answer as server-sent events, ``[DONE]`` last; a client
        that leaves mid-stream cancels its row at the next token."""
        self.scheduler.submit(job)
        finished = False
        try:
            if job.endpoint == "chat.completions":
                yield self._chunk(job, ChatDelta(role="assistant", content=""), None)
            while True:
                kind, value = await _event(job, gone)
                if kind == "text":
                    yield self._chunk(job, value, None)
                    continue
                if kind == "done":
                    yield self._chunk(job, None, value)
                else:
                    yield _sse({"error": {"message": str(value), "type": "server_error"}})
                break
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                job.cancelled.set()

    def _completion(self, job: Job, result: RowResult) -> Completion:
        reason = result.finish_reason
        choice: CompletionChoice | ChatChoice
        if job.endpoint == "chat.completions":
            chat = _chat_logprobs(self.tokenizer, result) if job.logprobs is not None else None
            message = ChatMessageOut(content=result.text)
            choice = ChatChoice(message=message, finish_reason=reason, logprobs=chat)
        else:
            text, logprobs = result.text, None
            if job.echo_from is not None or job.logprobs is not None:
                text, logprobs = _completion_logprobs(self.tokenizer, job, result)
            choice = CompletionChoice(text=text, finish_reason=reason, logprobs=logprobs)
        return Completion(
            id=job.request_id,
            object="chat.completion" if job.endpoint == "chat.completions" else "text_completion",
            created=int(time.time()),
            model=self.name,
            choices=[choice],  # type: ignore[arg-type]
            usage=_usage(result),
            attribution=self._attribution(result),
        )

    def _chunk(self, job: Job, text: str | ChatDelta | None, result: RowResult | None) -> str:
        """One streamed event: new text (or the chat's opening delta), or the end with
        ``result``."""
        reason = result.finish_reason if result else None
        choice: CompletionChoice | ChatChunkChoice
        if job.endpoint == "chat.completions":
            delta = text if isinstance(text, ChatDelta) else ChatDelta(content=text)
            choice = ChatChunkChoice(
                delta=delta if text is not None else ChatDelta(), finish_reason=reason
            )
        else:
            choice = CompletionChoice(text=str(text or ""), finish_reason=reason)
        chunk = Completion(
            id=job.request_id,
            object="chat.completion.chunk"
            if job.endpoint == "chat.completions"
            else "text_completion",
            created=int(time.time()),
            model=self.name,
            choices=[choice],  # type: ignore[arg-type]
            usage=_usage(result) if result else None,
            attribution=self._attribution(result) if result else None,
        )
        return _sse(chunk.model_dump(exclude=set() if result else {"usage", "attribution"}))

    def _attribution(self, result: RowResult) -> dict[str, float]:
        return {
            slot.name: round(share, 6)
            for slot, share in zip(self.slots, result.shares, strict=True)
        }


def _usage(result: RowResult) -> Usage:
    done = len(result.token_ids)
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=done,
        total_tokens=result.prompt_tokens + done,
    )


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _event(job: Job, gone: Disconnected) -> tuple[str, Any]:
    """The job's next event; a client that has gone meanwhile cancels the job (its row stops at
    the next token and is not billed) and ends the response."""
    getter = asyncio.ensure_future(job.events.get())
    while True:
        done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
        if done:
            return getter.result()  # type: ignore[no-any-return]
        if await gone():
            getter.cancel()
            job.cancelled.set()
            raise asyncio.CancelledError


def _wanted_logprobs(body: Sampling) -> int | None:
    """How many alternatives per token a request asks for; None: no log-probabilities."""
    if isinstance(body, ChatRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    if isinstance(body, CompletionRequest):
        return body.logprobs if body.logprobs is not None else (0 if body.echo else None)
    return None


def _piece(tokenizer: PreTrainedTokenizerBase, token: int) -> str:
    return str(tokenizer.decode([token]))


def _completion_logprobs(
    tokenizer: PreTrainedTokenizerBase, job: Job, result: RowResult
) -> tuple[str, CompletionLogprobs]:
    """The answer's text (after the prompt's, with echo) and OpenAI's logprobs for it."""
    entries: list[TokenLogprob | None] = []
    tokens: list[int] = []
    if job.echo_from is not None:
        tokens += job.prompt_ids[job.echo_from :]
        entries += result.prompt_logprobs
    tokens += result.token_ids
    entries += result.logprobs if job.logprobs is not None else [None] * len(result.token_ids)
    pieces = [_piece(tokenizer, t) for t in tokens]
    prompt = str(tokenizer.decode(tokens[: len(tokens) - len(result.token_ids)]))
    text = prompt + result.text if job.echo_from is not None else result.text
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    shown = job.logprobs or 0
    return text, CompletionLogprobs(
        tokens=pieces,
        token_logprobs=[e.logprob if e else None for e in entries],
        top_logprobs=[
            {_piece(tokenizer, t): lp for t, lp in e.top[:shown]} if e else None for e in entries
        ],
        text_offset=offsets,
    )


def _chat_logprobs(tokenizer: PreTrainedTokenizerBase, result: RowResult) -> ChatLogprobs:
    """OpenAI's chat logprobs: each generated token with its ``top_logprobs`` alternatives."""

    def top(token: int, logprob: float) -> TopLogprob:
        piece = _piece(tokenizer, token)
        return TopLogprob(token=piece, logprob=logprob, bytes=list(piece.encode("utf-8")))

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **top(e.token, e.logprob).model_dump(),
                top_logprobs=[top(t, lp) for t, lp in e.top],
            )
            for e in result.logprobs
        ]
    )
