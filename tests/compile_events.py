"""Counting what XLA compiles, from JAX's own compilation events (tests assert that a program compiles once)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from jax._src import dispatch


@contextlib.contextmanager
def compiled_programs() -> Iterator[list[str]]:
    """The names of the programs XLA compiles inside the block, in order (JAX's compilation events)."""
    names: list[str] = []

    def listen(event: str, seconds: float, **fields) -> None:
        if event == dispatch.BACKEND_COMPILE_EVENT:
            names.append(fields["fun_name"])

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
