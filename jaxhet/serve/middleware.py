"""The ASGI layer in front of every route: the API key, the request counter, and a JSON body for any failure.

- With an API key set, every path but `/health` (a load balancer's probe) needs `Authorization: Bearer KEY`: the
  API, `/metrics`, `/docs` and `/openapi.json` alike. The scheme is matched case-insensitively and the key in
  constant time, so response timing tells nothing about how much of a guess was right.
- Each response is counted once, labelled with the route it matched or `unmatched`, so the series of
  `jaxhet_requests_total` are bounded by the app's routes whatever paths clients send.
- An exception a route lets escape becomes an OpenAI-style JSON 500 (logged with its traceback), never plain text.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from prometheus_client import Counter

from jaxhet.serve.protocol import APIError

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
UNMATCHED = "unmatched"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def authorised(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Whether the request's `Authorization` header is `Bearer <api_key>` (scheme in any case)."""
    value = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, token = value.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key.encode("utf-8"))


async def send_error(send: Send, err: APIError) -> None:
    """Answer with `err` as a JSON body."""
    body = json.dumps(err.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Authorise, count and answer failures for `app`, whose route paths are `routes()` (read on first use, once
    every route is registered)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, requests: Counter, routes: Callable[[], Collection[str]]):
        self.app = app
        self.api_key = api_key
        self.requests = requests
        self._routes = routes
        self._known: frozenset[str] | None = None

    def _endpoint(self, path: str) -> str:
        if self._known is None:
            self._known = frozenset(self._routes())
        return path if path in self._known else UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self._endpoint(scope["path"])
        started = False

        async def counted(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        if self.api_key and scope["path"] not in OPEN_PATHS and not authorised(scope["headers"], self.api_key):
            message = "missing or invalid API key (Authorization: Bearer ...)"
            await send_error(counted, APIError(401, message, kind="authentication_error"))
            return
        try:
            await self.app(scope, receive, counted)
        except Exception:
            log.exception("%s %s failed", scope["method"], endpoint)
            if not started:
                await send_error(counted, APIError(500, "internal server error", kind="server_error"))
