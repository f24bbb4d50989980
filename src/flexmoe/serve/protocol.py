"""The API's request, response and error shapes: OpenAI's completions and chat completions,
validated up front (every sampling value within what the generator and float32 hold, allow-lists
never empty, text valid Unicode), flexmoe's experts endpoints, and OpenAI-style error bodies."""

from __future__ import annotations

from typing import Literal

import torch
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from flexmoe.inference.selection import Selection

MAX_STOP = 4
CHAT_STOP = ("\nUser:", "\nSystem:")
MAX_SEED = 2**63 - 1  # what torch's generator takes
MAX_LOGPROBS = 5  # alternatives per token in a completion (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # ... in a chat completion
MIN_TEMPERATURE = 1e-6  # below it (and above 0) logits / temperature overflow float32
MIN_TOP_P = float(torch.finfo(torch.float32).tiny)  # the least top_p float32 holds above 0


class ApiError(Exception):
    """A refusal: its status and the OpenAI-style error body it becomes."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind, self.code = kind, code


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    kind: str = "invalid_request_error",
    code: str | None = None,
) -> JSONResponse:
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
            include=frozenset(self.include or ()),
            exclude=frozenset(self.exclude or ()),
            licenses=frozenset(self.licenses or ()),
        )


class Sampling(BaseModel):
    # An OpenAI field this server does not honour is refused (400), never silently ignored.
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int = Field(default=16, ge=0)  # 0: only with echo (a prompt scored)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extension: no end-of-text before this
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
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

    @model_validator(mode="after")
    def _greedy_top_p(self) -> Sampling:
        """A nucleus too small for float32 (0 included) keeps only the likeliest token: greedy."""
        if self.top_p < MIN_TOP_P:
            self.top_p, self.temperature = 1.0, 0.0
        return self


def valid_unicode(text: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates), else a ValueError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (a lone surrogate)") from None
    return text


class CompletionRequest(Sampling):
    # one prompt: text, or token ids (as lm-evaluation-harness sends them), alone or in a list
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
        if value and isinstance(value, list) and not isinstance(value[0], int):
            if len(value) != 1:
                raise ValueError("give one prompt (text or token ids, or a list of one)")
            value = value[0]  # type: ignore[assignment]
        if isinstance(value, str):
            return valid_unicode(value)
        if not value:
            raise ValueError("the prompt has no tokens")
        return value  # type: ignore[return-value]

    def one_prompt(self) -> str | list[int]:
        """The prompt as the validator left it: one text or one list of token ids."""
        return self.prompt  # type: ignore[return-value]

    @model_validator(mode="after")
    def _scored(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 scores the prompt: it needs echo")
        if self.stream and (self.logprobs is not None or self.echo):
            raise ValueError("logprobs and echo come with the whole answer, not a stream")
        return self


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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer max_tokens

    @model_validator(mode="after")
    def _scored(self) -> ChatRequest:
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set:
                raise ValueError("give max_tokens or max_completion_tokens, not both")
            self.max_tokens = self.max_completion_tokens
        if self.max_tokens == 0:
            raise ValueError("max_tokens must be at least 1 for a chat completion")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream and self.logprobs:
            raise ValueError("logprobs come with the whole answer, not a stream")
        return self


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain template for base models: ``Role: content`` lines, then ``Assistant:``."""
    lines = [f"{m.role.capitalize()}: {m.content.strip()}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class OptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=500)


# Responses.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape: each token, its log-probability (None for the first
    echoed one), the likeliest alternatives and where the token starts in ``text``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present(self) -> dict[str, str]:
        """Only what the delta carries: ``{}`` at the end of a stream."""
        fields = (("role", self.role), ("content", self.content))
        return {key: value for key, value in fields if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None


class Completion(BaseModel):
    """A completion or chat completion, whole or one streamed chunk of it; ``attribution`` and
    ``usage`` come with the whole answer and the last chunk."""

    id: str
    object: Literal["text_completion", "chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[CompletionChoice] | list[ChatChoice] | list[ChatChunkChoice]
    usage: Usage | None = None
    attribution: dict[str, float] | None = None  # expert -> share of the routing mass


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flexmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    experts: int
    batches: int  # batches run so far
    cancelled: int  # rows cancelled because their client left
    largest_batch: int


class ExpertEntry(BaseModel):
    name: str
    owner: str
    license: str
    slot: int
    public: bool
    status: Literal["active", "opted-out"]
    reason: str
    updated: str | None
    routing_tuned: bool


class ExpertList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExpertEntry]


class OptResponse(BaseModel):
    name: str
    status: Literal["active", "opted-out"]


class ExpertUsage(BaseModel):
    name: str
    responses: int
    responses_total: int
    weighted_tokens: float
    mean_share: float
