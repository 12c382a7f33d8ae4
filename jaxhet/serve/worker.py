"""A serving process that is not the endpoint: it runs the plan's replicas on its own devices and serves them to
the endpoint process over TCP (`jaxhet.serve.frames`).

Every connection starts with a frame carrying the run's token (made by the endpoint and shared through JAX's
coordination service, so only processes of the run can drive a replica). A request is one connection: a
`generate` or `resume` frame (with the KV handoff's pages as payload), answered by one frame per output until the
finished one; a prefill's last frame carries the pages it hands over, exactly those the sequence uses. A client
closing the connection aborts the request (freeing its pages). One long-lived `control` connection from the
endpoint asks for the engines' snapshots (its liveness probe) and finally says `stop`: the worker then lets the
requests it holds finish and exits. Losing that connection without a `stop` (the endpoint died) stops the worker
too, with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
from collections.abc import AsyncIterator, Mapping
from typing import Any

from jaxhet.serve.async_engine import AsyncEngine, EngineFailure
from jaxhet.serve.frames import FrameError, read_frame, write_frame
from jaxhet.serve.messages import (
    handoff_from_frame,
    handoff_to_frame,
    output_to_json,
    params_from_json,
    snapshot_to_json,
)


class EndpointLost(RuntimeError):
    """The endpoint process went away without saying `stop`."""


class ReplicaWorker:
    """Serves `engines` (plan replica index -> engine on this process) to the endpoint; see the module docstring."""

    def __init__(self, engines: Mapping[int, AsyncEngine], token: str):
        self.engines = dict(engines)
        self.token = token
        self._done: asyncio.Future[str | None] | None = None

    async def serve(self, host: str, port: int = 0, on_listening=None) -> None:
        """Listen on `host:port` (`on_listening(address)` once bound), serve until the endpoint says stop or goes
        away (EndpointLost) or SIGTERM / SIGINT arrives, then let the requests held finish and close the engines."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        server = await asyncio.start_server(self._connection, host, port)
        for stop in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, ValueError):
                loop.add_signal_handler(stop, self._finish, None)
        address = server.sockets[0].getsockname()
        if on_listening is not None:
            on_listening(f"{address[0]}:{address[1]}")
        async with server:
            lost = await self._done
        for engine in self.engines.values():
            await engine.close()
        if lost is not None:
            raise EndpointLost(lost)

    def _finish(self, lost: str | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(lost)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header, payload = await read_frame(reader)
            if not hmac.compare_digest(str(header.get("token", "")), self.token):
                await write_frame(writer, {"error": "wrong or missing run token", "kind": "refused"})
                return
            if header.get("op") == "control":
                await self._control(reader, writer)
            else:
                await self._request(header, payload, reader, writer)
        except (FrameError, ConnectionError):
            pass  # the endpoint hung up: for a request that is an abort, done when its stream closed
        finally:
            writer.close()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                header, _ = await read_frame(reader)
            except (FrameError, ConnectionError):
                self._finish("the endpoint process closed its control connection without saying stop")
                return
            if header.get("op") == "stop":
                await write_frame(writer, {"stopping": True})
                self._finish(None)
                return
            snapshots = {str(i): snapshot_to_json(e.snapshot) for i, e in self.engines.items()}
            await write_frame(writer, {"snapshots": snapshots})

    def _stream(self, header: dict[str, Any], payload: bytes) -> AsyncIterator:
        engine = self.engines.get(header.get("replica"))
        if engine is None:
            raise ValueError(f"this process runs no replica {header.get('replica')!r}; it runs {sorted(self.engines)}")
        params = params_from_json(header["params"])
        if header["op"] == "resume":
            return engine.resume(header["request_id"], handoff_from_frame(header["handoff"], payload), params)
        return engine.generate(header["request_id"], header["prompt"], params, hand_off=header.get("hand_off", False))

    async def _request(
        self, header: dict[str, Any], payload: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Stream the request's outputs until its last; stop (aborting it) as soon as the endpoint hangs up."""
        hung_up = asyncio.ensure_future(reader.read(1))
        relay = asyncio.ensure_future(self._relay(header, payload, writer))
        try:
            await asyncio.wait({hung_up, relay}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (hung_up, relay):
                task.cancel()
            await asyncio.gather(hung_up, relay, return_exceptions=True)

    async def _relay(self, header: dict[str, Any], payload: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            stream = self._stream(header, payload)
            async for output in stream:
                handoff, extra = output.handoff, b""
                frame: dict[str, Any] = {"output": output_to_json(output)}
                if handoff is not None:
                    frame["handoff"], extra = handoff_to_frame(handoff)
                await write_frame(writer, frame, extra)
        except (ValueError, KeyError, TypeError) as err:
            await write_frame(writer, {"error": str(err), "kind": "invalid"})
        except Exception as err:  # noqa: BLE001 - a request's failure is its own, not its process's
            message = str(err) if isinstance(err, EngineFailure) else f"request failed: {err!r}"
            await write_frame(writer, {"error": message, "kind": "engine"})
