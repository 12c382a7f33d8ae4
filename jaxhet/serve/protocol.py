"""The OpenAI-compatible request bodies the server accepts, validated strictly, and the error body it answers with.

Fields of OpenAI's API that would change the answer and that the server does not implement are refused by name
when set to anything but their neutral value, so a client never silently gets something other than what it asked
for; fields that change nothing here (`user`, `metadata`, `store`, ...) and fields it does not know are ignored, so
clients that send extras of their own keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 256
MAX_LOGPROBS = 20
MAX_CHOICES = 16
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection first

# Fields not implemented here, each with the values that ask for nothing (accepted, like leaving the field out).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logit_bias": ({},),
    "stream_options": ({}, {"include_usage": False}),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "reasoning_effort": (),
    "web_search_options": (),
}


class APIError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, the offending parameter and a message."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def _neutral_only(value: Any, info: ValidationInfo) -> Any:
    if value is not None and value not in NEUTRAL_VALUES[info.field_name]:
        raise ValueError(f"{info.field_name} is not supported by this server; leave it unset")
    return value


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, phrased with the dotted name of the field it concerns."""
    first = err.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    return APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    # Unset: the model's generation_config.json default, else the API's (temperature 1, top_p 1, top_k off).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    user: str | None = None
    logit_bias: Any = None
    stream_options: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
            limits = f"at most {MAX_STOP_STRINGS} non-empty stop strings of at most {MAX_STOP_LENGTH} characters"
            raise ValueError(limits)
        return value

    @field_validator("logit_bias", "stream_options")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Request):
    """`POST /v1/completions`: a prompt (text or token ids; one per request) to continue."""

    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Literal[False] = False
    suffix: None = None
    best_of: int | None = Field(default=None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[int]) -> str | list[int]:
        if len(value) == 0:
            raise ValueError("the prompt must not be empty")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Request):
    """`POST /v1/chat/completions`: a conversation whose next assistant message is generated."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None

    @field_validator(
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "response_format",
        "modalities",
        "audio",
        "reasoning_effort",
        "web_search_options",
    )
    @classmethod
    def _unsupported_in_chat(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral_only(value, info)

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
