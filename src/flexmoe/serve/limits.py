"""Limits that keep one client from hurting the others: request body size and stalls (ASGI
middleware), and failed token attempts per client address."""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from flexmoe.serve.protocol import ApiError, error_response

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before parsing
MAX_READ_S = 30.0  # a request body still arriving after this long is cut off (408)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before anything parses
    it, whether its length is declared or it arrives in chunks; a body whose next chunk takes
    longer than ``read_timeout_s``, or that is still arriving ``deadline_s`` after the request
    began, gets a 408 (a slow-drip client is cut off, however it paces its bytes). Reading stops
    there, and whatever the app answers to the cut body is replaced by the refusal."""

    def __init__(
        self, app: Any, limit: int, read_timeout_s: float = 10.0, deadline_s: float = MAX_READ_S
    ) -> None:
        self.app, self.limit = app, limit
        self.read_timeout_s, self.deadline_s = read_timeout_s, deadline_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, 413, f"the request body is larger than {self.limit:,} bytes")
            return
        deadline = time.monotonic() + self.deadline_s
        seen, complete = 0, False
        refusal: tuple[int, str] | None = None
        cut = {"type": "http.request", "body": b"", "more_body": False}

        async def counted() -> Any:
            nonlocal seen, refusal, complete
            if refusal:
                return cut
            if complete:  # after the body: only a disconnect can come, wait as long as it takes
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(
                    receive(), max(0.0, min(left, self.read_timeout_s))
                )
            except TimeoutError:
                refusal = (408, self._late(left))
                return cut
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.limit:
                    refusal = (413, f"the request body is larger than {self.limit:,} bytes")
                    return cut
            return message

        async def answered(message: Any) -> None:
            if refusal is None:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(send, *refusal)

        await self.app(scope, counted, answered)

    def _late(self, left: float) -> str:
        if left <= self.read_timeout_s:
            return f"the request body took over {self.deadline_s:g} s to arrive"
        return f"the request body stalled for over {self.read_timeout_s:g} s"

    async def _refuse(self, send: Any, status: int, message: str) -> None:
        response = error_response(status, message)
        headers = [*response.raw_headers, (b"connection", b"close")]  # the rest goes unread
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})


class FailureLimiter:
    """Failed token attempts per client address: at most ``limit`` in any ``window_s`` seconds,
    counting the attempts still being checked (so concurrent guesses cannot slip past); beyond
    that the client gets 429 until the oldest failure ages out. Memory stays bounded: at most
    ``max_clients`` addresses are tracked (the stalest dropped first)."""

    def __init__(self, limit: int = 10, window_s: float = 60.0, max_clients: int = 10_000):
        self.limit, self.window_s, self.max_clients = limit, window_s, max_clients
        self.failures: dict[str, collections.deque[float]] = {}
        self.checking: collections.Counter[str] = collections.Counter()

    def _recent(self, client: str, now: float) -> collections.deque[float]:
        times = self.failures.get(client, collections.deque())
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def begin(self, client: str) -> None:
        """Start checking one token from ``client``; 429 if it may not try now."""
        now = time.monotonic()
        times = self._recent(client, now)
        if len(times) + self.checking[client] >= self.limit:
            wait = int(self.window_s - (now - times[0])) + 1 if times else 1
            raise ApiError(
                429,
                f"too many failed token attempts; retry in {wait} s",
                kind="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.checking[client] += 1

    def end(self, client: str, *, failed: bool) -> None:
        """The check :meth:`begin` started is over; a failure counts for the window."""
        self.checking[client] -= 1
        if self.checking[client] <= 0:
            del self.checking[client]
        if not failed:
            return
        now = time.monotonic()
        times = self._recent(client, now)
        times.append(now)
        self.failures.pop(client, None)
        self.failures[client] = times  # the most recent failures last
        while len(self.failures) > self.max_clients:
            self.failures.pop(next(iter(self.failures)))
