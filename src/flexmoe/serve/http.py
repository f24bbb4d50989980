"""The HTTP server under the app: uvicorn's h11 protocol, with the requests that never reach the
app (a garbage request line, HTTP/1.1 without ``Host``, a negative ``Content-Length``) answered
400 with an OpenAI-style JSON body like every other refusal, not uvicorn's plain text."""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn import Config
from uvicorn.protocols.http.h11_impl import H11Protocol


class JsonErrorH11Protocol(H11Protocol):
    """h11, with its malformed-request answer in the API's error shape."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            {
                "error": {
                    "message": f"malformed HTTP request ({msg.rstrip('.')})",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def server_config(app: Any, *, host: str, port: int, log_level: str = "info") -> Config:
    """How flexmoe runs ``app``: the protocol above, no access log (uvicorn's prints query
    strings, where a client may have put a token) and no WebSocket upgrades (nothing here
    speaks WebSocket)."""
    return Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=JsonErrorH11Protocol,
        ws="none",
    )
