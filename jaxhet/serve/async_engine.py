"""`AsyncEngine`: one `Engine` stepping on its own thread, with asyncio streams of each request's outputs.

The engine is not thread-safe and its steps block for as long as the device takes, so it lives on a dedicated
thread that owns it alone; the event loop talks to it through a command queue (add, abort, stop) and receives
outputs through per-request asyncio queues. A request whose consumer goes away (a client disconnecting
mid-stream) is aborted, which frees its KV pages at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from jaxhet.serve.config import SamplingParams
from jaxhet.serve.engine import Engine, EngineStats, KVHandoff, RequestOutput

RATE_WINDOW_S = 10.0


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """What the engine thread last published: its counters and tokens generated per recent second."""

    stats: EngineStats
    tokens_by_second: tuple[tuple[int, int], ...] = ()

    def tokens_per_second(self, now: float | None = None) -> float:
        """Generated tokens per second over the last `RATE_WINDOW_S` seconds."""
        now = time.monotonic() if now is None else now
        return sum(n for second, n in self.tokens_by_second if now - second <= RATE_WINDOW_S) / RATE_WINDOW_S


class EngineFailure(RuntimeError):
    """A request failed inside the engine: on its own (its neighbours step on), or with its whole batch when the
    step itself failed (the requests it held are aborted); either way the engine goes on serving."""


class ReplicaLost(EngineFailure):
    """A request's replica is gone: its process died or stopped answering, or no replica of a role is left up.
    The endpoint answers 503 (the server is up; that capacity is not)."""

    status = 503


class _Sink:
    """Hands items from the engine thread to one request's asyncio queue on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more


class AsyncEngine:
    """Serve an `Engine` to asyncio code: `async for out in engine.generate(...)`."""

    def __init__(self, engine: Engine, *, name: str, node: str = "local"):
        self.engine = engine
        self.name = name
        self.node = node
        self.routed_rps = 1.0  # the model's traffic routed here, relative to its other replicas (`ModelDeployment`)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._tokens_by_second: collections.deque[tuple[int, int]] = collections.deque()
        self._snapshot = EngineSnapshot(engine.stats())
        self._in_flight = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    @property
    def closed(self) -> bool:
        """Whether the engine thread has stopped (after `close`), so the engine holds no request any more."""
        return not self._thread.is_alive()

    @property
    def available(self) -> bool:
        """Whether new requests may come here (until `close`)."""
        return not self._closing

    @property
    def devices(self) -> tuple:
        return self.engine.devices

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def load(self) -> int:
        """Requests submitted and not yet finished, the measure replicas are balanced by."""
        return self._in_flight

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *, hand_off: bool = False
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until the finished one; ValueError if the engine refuses it.

        Leaving the iteration early (or being cancelled) aborts the request. `hand_off` as in `Engine.add_request`.
        """

        def submit(engine: Engine) -> None:
            engine.add_request(request_id, prompt_token_ids, params, hand_off=hand_off)

        return self._stream(request_id, submit)

    def resume(self, request_id: str, handoff: KVHandoff, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Continue a request another engine prefilled (`Engine.add_handoff`), yielding outputs as `generate`."""
        return self._stream(request_id, lambda e: e.add_handoff(request_id, handoff, params))

    async def _stream(self, request_id: str, submit: Callable[[Engine], None]) -> AsyncIterator[RequestOutput]:
        if self._closing:
            raise EngineFailure(f"{self.name}: the engine has been closed")
        sink = _Sink(asyncio.get_running_loop())
        self._in_flight += 1
        self._commands.put(("add", request_id, submit, sink))
        finished = False
        try:
            while not finished:
                item = await sink.queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._in_flight -= 1
            if not finished:
                self._commands.put(("abort", request_id))

    async def close(self) -> None:
        """Stop the engine thread once every request it holds has finished; later requests fail at once."""
        self._closing = True
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        stopping = False
        while not (stopping and not self.engine.has_unfinished()):
            busy = self.engine.has_unfinished()
            try:
                command = self._commands.get(block=not busy)
            except queue.Empty:
                command = None
            while command is not None:
                stopping |= self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if self.engine.has_unfinished():
                self._step()
            else:
                self._publish(new_tokens=0)

    def _step(self) -> None:
        before = self.engine.stats().generated_tokens
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - a failed step fails the requests it held, not the server
            for request_id, sink in self._sinks.items():
                self.engine.abort_request(request_id)
                sink.put(EngineFailure(f"{self.name}: engine step failed: {err!r}"))
            self._sinks.clear()
            outputs = []
        for output in outputs:
            self._deliver(output)
        self._publish(new_tokens=self.engine.stats().generated_tokens - before)

    def _apply(self, command: tuple[Any, ...]) -> bool:
        """Carry out one command; True when it asks the thread to stop."""
        kind = command[0]
        if kind == "add":
            _, request_id, submit, sink = command
            try:
                submit(self.engine)
            except ValueError as err:
                sink.put(err)
            else:
                self._sinks[request_id] = sink
        elif kind == "abort":
            self.engine.abort_request(command[1])
            self._sinks.pop(command[1], None)
        return kind == "stop"

    def _deliver(self, output: RequestOutput) -> None:
        sink = self._sinks.get(output.request_id)
        if sink is None:
            return
        if output.finished:
            del self._sinks[output.request_id]
        sink.put(EngineFailure(f"{self.name}: request failed: {output.error}") if output.error else output)

    def _publish(self, new_tokens: int) -> None:
        second = int(time.monotonic())
        if self._tokens_by_second and self._tokens_by_second[-1][0] == second:
            second, count = self._tokens_by_second.pop()
        else:
            count = 0
        self._tokens_by_second.append((second, count + new_tokens))
        while second - self._tokens_by_second[0][0] > RATE_WINDOW_S:
            self._tokens_by_second.popleft()
        self._snapshot = EngineSnapshot(self.engine.stats(), tuple(self._tokens_by_second))
