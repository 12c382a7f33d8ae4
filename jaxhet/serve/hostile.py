"""Requests a careless or hostile client sends to the OpenAI-compatible API, for checking a server against them.

A server must answer each of them below 500, every refusal with an OpenAI-style JSON error body, within a client
timeout, and serve its other requests unchanged meanwhile. The fuzz test and the soak benchmark (`bench/serve.py
--soak`) send the same corpus:

- `hostile_requests`: a hand-written list (every sampling field set to out-of-range, wrong-typed and extreme values,
  unimplemented fields, lone surrogates, deep nesting, NaN, over-long numbers, bodies that are not objects, wrong
  methods and paths) and seeded variations of valid bodies (truncated, bytes flipped, fields retyped);
- `malformed_http`: raw bytes that are not HTTP/1.1 (garbled request lines, bad Content-Length, NUL in the path).

Bodies ask for at most a few tokens, so the valid ones among them stay cheap.
"""

from __future__ import annotations

import dataclasses
import json
import random

FIELD_VALUES = (2**31, 2**63, -(2**63), -1, 0, 2.5, 1e308, -1e308, "7", "", None, [], {}, True, 0.5, 10**30)
COMPLETION_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "n", "logprobs", "seed", "stop", "presence_penalty")
CHAT_FIELDS = ("top_logprobs", "max_completion_tokens", "top_k", "logprobs", "temperature")
UNIMPLEMENTED = {
    "logit_bias": {"50": 100},
    "stream_options": {"include_usage": True},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
    "response_format": {"type": "json_object"},
    "modalities": ["text", "audio"],
    "reasoning_effort": "high",
}


@dataclasses.dataclass(frozen=True)
class HostileRequest:
    """One request: what it tries, and the method, path and raw JSON body (None: no body) it is sent with."""

    label: str
    method: str
    path: str
    body: bytes | None


def _post(path: str, label: str, body: bytes) -> HostileRequest:
    return HostileRequest(label, "POST", path, body)


def _hand_written(model: str) -> list[HostileRequest]:
    base = {"model": model, "prompt": "a", "max_tokens": 2}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deep = 1500  # past Python's recursion limit
    raw_model = json.dumps(model).encode()
    cases = [
        _post("/v1/completions", f"{field}={value!r}", json.dumps({**base, field: value}).encode())
        for field in COMPLETION_FIELDS
        for value in FIELD_VALUES
    ]
    cases += [
        _post("/v1/chat/completions", f"chat {field}={value!r}", json.dumps({**chat, field: value}).encode())
        for field in CHAT_FIELDS
        for value in FIELD_VALUES
    ]
    cases += [
        _post("/v1/chat/completions", f"{field} set", json.dumps({**chat, field: value}).encode())
        for field, value in UNIMPLEMENTED.items()
    ]
    cases += [
        _post("/v1/completions", "lone surrogate in a prompt", b'{"model": ' + raw_model + b', "prompt": "a\\ud800b"}'),
        _post(
            "/v1/chat/completions",
            "lone surrogate in chat",
            b'{"model": ' + raw_model + b', "messages": [{"role": "user", "content": "\\udfff"}]}',
        ),
        _post(
            "/v1/completions", "lone surrogate in a key", b'{"model": ' + raw_model + b', "prompt": "a", "\\ud800": 1}'
        ),
        _post("/v1/completions", "lone surrogate as the model", b'{"model": "\\ud800", "prompt": "a"}'),
        _post("/v1/completions", f"nested {deep} deep", b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}"),
        _post("/v1/completions", "nested 40 deep", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}"),
        _post("/v1/completions", "NaN temperature", json.dumps(base)[:-1].encode() + b', "temperature": NaN}'),
        _post("/v1/completions", "Infinity top_p", json.dumps(base)[:-1].encode() + b', "top_p": Infinity}'),
        _post(
            "/v1/completions", "5000-digit seed", json.dumps(base)[:-1].encode() + b', "seed": ' + b"9" * 5000 + b"}"
        ),
        _post("/v1/completions", "long stop string", json.dumps({**base, "stop": "x" * 300}).encode()),
        _post("/v1/completions", "max_tokens past the context", json.dumps({**base, "max_tokens": 10**6}).encode()),
        _post("/v1/completions", "a prompt past the context", json.dumps({**base, "prompt": [1] * 100_000}).encode()),
        _post("/v1/completions", "token outside the vocabulary", json.dumps({**base, "prompt": [2**40]}).encode()),
        _post("/v1/completions", "prompt of nested lists", json.dumps({**base, "prompt": [[1]]}).encode()),
        _post("/v1/completions", "unknown model", json.dumps({**base, "model": "gpt-9"}).encode()),
        _post("/v1/completions", "a list body", b"[1, 2, 3]"),
        _post("/v1/completions", "a null body", b"null"),
        _post("/v1/completions", "an empty body", b""),
        _post("/v1/completions", "invalid UTF-8", b'{"model": "\xff\xfe"}'),
        _post("/v1/completions", "duplicate keys", b'{"model": 1, "model": ' + raw_model + b', "prompt": 5}'),
        _post("/v1/chat/completions", "messages not a list", json.dumps({**chat, "messages": "hi"}).encode()),
        _post(
            "/v1/chat/completions", "content not text", json.dumps({**chat, "messages": [{"role": "user"}]}).encode()
        ),
        _post("/v1/chat/completions", "a tool message", json.dumps({**chat, "messages": [{"role": "tool"}]}).encode()),
        _post("/v1/chat/completions", "no messages", json.dumps({**chat, "messages": []}).encode()),
        _post("/v1/models", "POST to a GET route", b"{}"),
        _post("/v1/../../etc/passwd", "path traversal", b"{}"),
        _post("/v1/completions%00", "NUL in the path", b"{}"),
        HostileRequest("GET a POST route", "GET", "/v1/completions", None),
        HostileRequest("DELETE a model", "DELETE", "/v1/models", None),
        HostileRequest("a random path", "GET", "/admin/../../" + "x" * 2000, None),
    ]
    return cases


def _variations(model: str, rng: random.Random, count: int) -> list[HostileRequest]:
    """Seeded damage to valid bodies: cut short, a byte flipped, a field retyped, or a field of another endpoint."""
    valid = [
        ("/v1/completions", {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0}),
        ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ]
    fields = sorted({*COMPLETION_FIELDS, *CHAT_FIELDS, "model", "prompt", "messages", "stream"})
    cases = []
    for index in range(count):
        path, body = rng.choice(valid)
        raw = json.dumps(body).encode()
        kind = index % 3
        if kind == 0:
            cut = rng.randrange(1, len(raw))
            cases.append(_post(path, f"cut at byte {cut}", raw[:cut]))
        elif kind == 1:
            at = rng.randrange(len(raw))
            flipped = raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1 :]
            cases.append(_post(path, f"byte {at} replaced", flipped))
        else:
            field, value = rng.choice(fields), rng.choice(FIELD_VALUES)
            cases.append(_post(path, f"{field} retyped to {value!r}", json.dumps({**body, field: value}).encode()))
    return cases


def hostile_requests(model: str, *, variations: int = 120, seed: int = 0) -> list[HostileRequest]:
    """The hand-written list for a server serving `model`, then `variations` seeded variations of valid bodies."""
    return _hand_written(model) + _variations(model, random.Random(seed), variations)


def malformed_http() -> list[tuple[str, bytes]]:
    """(label, raw bytes) of requests that are not HTTP/1.1; each must get a 400 and the connection closed."""
    return [
        ("garbled request line", b"GARBAGE\r\n\r\n"),
        ("no Host header", b"GET /health HTTP/1.1\r\n\r\n"),
        ("Content-Length not a number", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
        (
            "two Content-Lengths",
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        ("NUL in the path", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("space in the path", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ]
