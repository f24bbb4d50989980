"""The API's request and error shapes: OpenAI's completions and chat completions, validated up
front (every sampling value within what the generator and float32 hold, allow-lists never empty,
text valid Unicode), and OpenAI-style error bodies."""

from __future__ import annotations

from typing import Literal

import torch
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flexmoe.inference.selection import Selection

MAX_STOP = 4
CHAT_STOP = ("\nUser:", "\nSystem:")
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


def error_response(
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


class Sampling(BaseModel):
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
            valid_unicode(stop)
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


def valid_unicode(text: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates), else a ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return text


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            value = value[0]
        return valid_unicode(value)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content(cls, value: str) -> str:
        return valid_unicode(value)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain template for base models: ``Role: content`` lines, then ``Assistant:``."""
    lines = [f"{m.role.capitalize()}: {m.content.strip()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class OptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)
