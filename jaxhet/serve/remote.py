"""The endpoint's side of a multi-process server: a `WorkerLink` per other process and a `RemoteReplica` per
replica running there, which deployments route to exactly as to a local `AsyncEngine`.

A link keeps one control connection to its worker (`jaxhet.serve.worker`) and asks it for its engines' snapshots
every `POLL_S`: that is what /metrics shows for remote replicas, and the liveness probe. A worker that does not
answer within `DEAD_AFTER_S`, refuses a connection, or drops one in the middle of a request is marked down: the
requests it held end at once with `ReplicaLost` (a clear error naming the process and its nodes), routing
leaves its replicas out from then on, and /health and /metrics report it. Nothing waits on a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jax

from jaxhet.serve.async_engine import EngineFailure, EngineSnapshot, ReplicaLost
from jaxhet.serve.config import SamplingParams
from jaxhet.serve.engine import EngineStats, KVHandoff, RequestOutput
from jaxhet.serve.frames import FrameError, read_frame, write_frame
from jaxhet.serve.messages import (
    handoff_from_frame,
    handoff_to_frame,
    output_from_json,
    params_to_json,
    snapshot_from_json,
)
from jaxhet.tokenizers import Tokenizer

POLL_S = 0.5
DEAD_AFTER_S = 10.0
CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 120.0


class WorkerLink:
    """The endpoint's connection to process `process` (running `nodes`) listening at `address` ("host:port")."""

    def __init__(self, process: int, nodes: Sequence[str], address: str, token: str):
        self.process = process
        self.nodes = tuple(nodes)
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.token = token
        self.down_reason: str | None = None
        self.snapshots: dict[int, EngineSnapshot] = {}
        self.handoff_bytes = {"sent": 0, "received": 0}
        self._requests: set[asyncio.StreamWriter] = set()
        self._control: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def up(self) -> bool:
        return self.down_reason is None

    @property
    def node(self) -> str:
        """The process's nodes, as metrics label them."""
        return ",".join(self.nodes)

    def describe(self) -> str:
        return f"process {self.process} (node {', '.join(self.nodes)})"

    async def start(self) -> None:
        """Open the control connection and start polling (on the server's event loop)."""
        try:
            self._control = await self.connect({"op": "control"})
        except ReplicaLost:
            return
        self._poller = asyncio.ensure_future(self._poll())

    async def connect(self, first: dict[str, Any], payload: bytes = b"") -> tuple[Any, Any]:
        """A new connection to the worker with `first` sent on it; ReplicaLost if the worker cannot be reached."""
        if not self.up:
            raise ReplicaLost(f"{self.describe()} is down: {self.down_reason}")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout=CONNECT_TIMEOUT_S
            )
            await write_frame(writer, {**first, "token": self.token}, payload)
        except (OSError, asyncio.TimeoutError) as err:
            raise self.lost(f"cannot reach it at {self.host}:{self.port}: {err!r}") from None
        return reader, writer

    def lost(self, reason: str) -> ReplicaLost:
        """Mark the process down (once), end every request it holds, and return the error to raise."""
        if self.up:
            self.down_reason = reason
            for writer in list(self._requests):
                writer.close()
        return ReplicaLost(f"{self.describe()} is down: {self.down_reason}")

    async def exchange(self, first: dict[str, Any], payload: bytes = b"") -> AsyncIterator[tuple[dict, bytes]]:
        """The frames the worker answers a request with, up to the last (closing the connection, which aborts the
        request, if the caller stops early); ReplicaLost when the process dies or stops answering meanwhile."""
        reader, writer = await self.connect(first, payload)
        self._requests.add(writer)
        try:
            while True:
                try:
                    header, body = await read_frame(reader)
                except (FrameError, ConnectionError) as err:
                    raise self.lost(f"it dropped a request's connection ({err})") from None
                yield header, body
        finally:
            self._requests.discard(writer)
            writer.close()

    async def _poll(self) -> None:
        assert self._control is not None
        reader, writer = self._control
        while self.up:
            try:
                await write_frame(writer, {"op": "stats"})
                header, _ = await asyncio.wait_for(read_frame(reader), timeout=DEAD_AFTER_S)
            except asyncio.TimeoutError:
                self.lost(f"it did not answer a probe within {DEAD_AFTER_S:.0f} s")
                return
            except (FrameError, ConnectionError) as err:
                self.lost(f"its control connection broke ({err})")
                return
            self.snapshots = {int(i): snapshot_from_json(s) for i, s in header["snapshots"].items()}
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        """Tell the worker to finish what it holds and exit (waiting up to `STOP_TIMEOUT_S` for it to agree)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._control is None or not self.up:
            return
        reader, writer = self._control
        with contextlib.suppress(FrameError, ConnectionError, asyncio.TimeoutError):
            await write_frame(writer, {"op": "stop"})
            await asyncio.wait_for(read_frame(reader), timeout=STOP_TIMEOUT_S)
        writer.close()


@dataclasses.dataclass
class RemoteReplica:
    """A replica of the plan (index `replica`) on another process, behind `link`; it routes like an `AsyncEngine`
    (`generate`, `resume`, `load`, `snapshot`). KV handoffs cross as their pages' bytes, counted on the link."""

    link: WorkerLink
    replica: int
    name: str
    devices: tuple[jax.Device, ...]
    tokenizer: Tokenizer
    max_model_len: int
    routed_rps: float = 1.0
    _in_flight: int = 0

    @property
    def node(self) -> str:
        return self.link.node

    @property
    def load(self) -> int:
        return self._in_flight

    @property
    def available(self) -> bool:
        return self.link.up

    @property
    def snapshot(self) -> EngineSnapshot:
        return self.link.snapshots.get(self.replica, EngineSnapshot(EngineStats()))

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, hand_off: bool = False
    ) -> AsyncIterator[RequestOutput]:
        first = {"op": "generate", "prompt": list(prompt_token_ids), "hand_off": hand_off}
        return self._stream(request_id, params, first, b"")

    def resume(self, request_id: str, handoff: KVHandoff, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        header, payload = handoff_to_frame(handoff)
        self.link.handoff_bytes["sent"] += len(payload)
        return self._stream(request_id, params, {"op": "resume", "handoff": header}, payload)

    async def _stream(
        self, request_id: str, params: SamplingParams, first: dict[str, Any], payload: bytes
    ) -> AsyncIterator[RequestOutput]:
        first = {**first, "replica": self.replica, "request_id": request_id, "params": params_to_json(params)}
        self._in_flight += 1
        try:
            async for header, body in self.link.exchange(first, payload):
                if "error" in header:
                    failure = EngineFailure if header.get("kind") == "engine" else ValueError
                    raise failure(header["error"])
                handoff = None
                if "handoff" in header:
                    handoff = handoff_from_frame(header["handoff"], body)
                    self.link.handoff_bytes["received"] += len(body)
                output = output_from_json(header["output"], handoff)
                yield output
                if output.finished:
                    return
        finally:
            self._in_flight -= 1

    async def close(self) -> None:
        """Wait until the requests this replica holds have ended (the link's `stop` stops the process)."""
        while self._in_flight and self.link.up:
            await asyncio.sleep(0.01)
