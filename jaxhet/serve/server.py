"""Running the HTTP app for real: in the foreground for `jaxhet serve`, or on a background thread for notebooks
and tests, always a uvicorn server listening on a socket.

In the foreground, SIGINT/SIGTERM stop accepting connections, let in-flight requests finish (up to
`drain_timeout_s`), then close the engines.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class _DrainingServer(uvicorn.Server):
    """A uvicorn server whose SIGINT/SIGTERM drain and then exit with status 0.

    uvicorn re-raises the captured signal once it has shut down, so a clean drain would still end as "killed by
    SIGTERM"; a process supervisor should instead see a normal exit.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_forever(app: FastAPI, *, host: str, port: int, drain_timeout_s: float = 60.0, log_level: str = "info"):
    """Serve until interrupted, draining in-flight requests on the way out."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout_s)
    _DrainingServer(config).run()


class BackgroundServer:
    """`with BackgroundServer(app) as server: ... server.url ...`: a real server on a free port of `host`.

    Where a `with` block cannot span the work (notebook cells), `server = BackgroundServer(app).start()` and later
    `server.stop()` do the same.
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0):
        self._socket = _bind(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30)
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
