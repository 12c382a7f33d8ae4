"""Reading one request body into a pydantic model, each way it can be wrong answered with its own 4xx.

The steps, in order: the declared and the actual size against a limit (413); the whole body within a time limit, so
a client that stops half-way does not hold the connection (408; one that hangs up half-way gets a 499, its own
doing and no server error); strict UTF-8; JSON without NaN or Infinity and no deeper than `MAX_DEPTH` (400, never a
RecursionError); no lone UTF-16 surrogate in any string, which JSON's `\\ud800` escapes allow but no text can be
encoded with (400 naming the field); then the model's own validation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from jaxhet.serve.protocol import CLIENT_GONE, APIError, validation_error

MAX_DEPTH = 32
_Model = TypeVar("_Model", bound=BaseModel)


async def read_body(request: Request, model: type[_Model], *, max_bytes: int, timeout_s: float) -> _Model:
    """The body of `request` as a validated `model`; APIError saying what is wrong otherwise."""
    data = await read_json(request, max_bytes=max_bytes, timeout_s=timeout_s)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


async def read_json(request: Request, *, max_bytes: int, timeout_s: float) -> Any:
    """The body of `request` as decoded JSON, through every check but a model's validation."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is larger than {max_bytes} bytes")
    try:
        raw = await asyncio.wait_for(_read(request, max_bytes), timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise APIError(CLIENT_GONE, "the client closed the connection before sending the whole body") from None
    data = _parse(raw)
    _check_structure(data)
    return data


async def _read(request: Request, max_bytes: int) -> bytes:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise APIError(413, f"the request body is larger than {max_bytes} bytes")
    return bytes(raw)


def _refuse_constant(name: str) -> Any:
    raise APIError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _parse(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise APIError(400, f"the request body is not valid JSON: {err.msg} (line {err.lineno})") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except ValueError as err:  # a number too long for Python to convert, for one
        raise APIError(400, f"the request body is not valid JSON: {err}") from None


def _check_structure(data: Any) -> None:
    """Refuse nesting deeper than `MAX_DEPTH` and strings (values or keys) holding a lone surrogate, naming the
    dotted path of the first offender; iterative, so no input can exhaust the stack."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while pending:
        value, path = pending.pop()
        if len(path) > MAX_DEPTH:
            raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, (*path, key))
                pending.append((item, (*path, key)))
        elif isinstance(value, list):
            pending.extend((item, (*path, str(index))) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: tuple[str, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        field = ".".join(part.encode("utf-8", "backslashreplace").decode() for part in path) or None
        where = f"{field}: " if field else ""
        message = f"{where}holds a lone UTF-16 surrogate (\\u{ord(text[err.start]):04x}), which is not text"
        raise APIError(400, message, param=field) from None
