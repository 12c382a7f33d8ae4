"""Running the HTTP app for real: in the foreground for `jaxhet serve`, or on a background thread for notebooks
and tests, always a uvicorn server listening on a socket.

In the foreground, SIGINT/SIGTERM stop accepting connections, let in-flight requests finish (up to
`drain_timeout_s`), then close the engines; SIGHUP runs a given coroutine (`jaxhet serve` re-reads its plan). A
connection must deliver a request's headers within `header_timeout_s` of opening (or of its previous response), so
half-sent requests cannot pile up; the body's own time limit is the app's (`ServerConfig.read_timeout_s`). A request
that is not HTTP/1.1 at all (a garbled request line, a bad Content-Length, ...) is answered, like every other error,
with an OpenAI-style JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from jaxhet.serve.protocol import APIError

HEADER_TIMEOUT_S = 10.0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port`; OSError (a busy port, an address not of this machine) names both."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose next request's headers do not arrive in time and
    answering unparsable requests with a JSON 400 (uvicorn's own is plain text)."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(APIError(400, f"the request is not valid HTTP/1.1: {msg}").body()).encode()
        length = str(len(body)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", length), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self._header_timeout_s, self._expire)

    def _expire(self) -> None:
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


def _config(app: FastAPI, header_timeout_s: float, **options) -> uvicorn.Config:
    protocol = functools.partial(_HeaderDeadline, header_timeout_s=header_timeout_s)
    return uvicorn.Config(app, http=protocol, **options)  # type: ignore[arg-type]


class _DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGINT/SIGTERM drain and then exit with status 0, and whose SIGHUP starts
    `on_hangup()` on the event loop (when given) while serving goes on.

    uvicorn re-raises the captured signal once it has shut down, so a clean drain would still end as "killed by
    SIGTERM"; a process supervisor should instead see a normal exit.
    """

    def __init__(self, config: uvicorn.Config, on_hangup: Callable[[], Awaitable[None]] | None = None):
        super().__init__(config)
        self._on_hangup = on_hangup
        self._hangups: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        loop = asyncio.get_running_loop()
        if self._on_hangup is not None:
            loop.add_signal_handler(signal.SIGHUP, self._hangup)
        try:
            yield
        finally:
            if self._on_hangup is not None:
                loop.remove_signal_handler(signal.SIGHUP)
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _hangup(self) -> None:
        assert self._on_hangup is not None
        task = asyncio.ensure_future(self._on_hangup())
        self._hangups.add(task)  # held until done, so that it is not collected mid-way
        task.add_done_callback(self._hangups.discard)


def serve_forever(
    app: FastAPI,
    sock: socket.socket,
    *,
    drain_timeout_s: float = 60.0,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    log_level: str = "info",
    on_hangup: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve on `sock` (from `bind`, so that a busy port is found before any work) until interrupted, draining
    in-flight requests on the way out; each SIGHUP runs `on_hangup()` (when given) beside the requests."""
    config = _config(app, header_timeout_s, log_level=log_level, timeout_graceful_shutdown=drain_timeout_s)
    _DrainingServer(config, on_hangup).run(sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(app) as server: ... server.url ...`: a real server on a free port of `host`.

    Where a `with` block cannot span the work (notebook cells), `server = BackgroundServer(app).start()` and later
    `server.stop()` do the same.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout_s: float = 120.0,
        header_timeout_s: float = HEADER_TIMEOUT_S,
    ):
        self._socket = bind(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        config = _config(app, header_timeout_s, log_level="warning", timeout_graceful_shutdown=30)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="jaxhet-server", daemon=True
        )
        self._startup_timeout_s = startup_timeout_s

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        """Start serving and return once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop accepting requests, finish the ones in flight, close the app's engines and the socket."""
        self._server.should_exit = True
        self._thread.join()
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
