"""Calling jitted programs that span several devices so that their collectives cannot stall one another.

On CPU every device of a program runs as a task of one shared thread pool (as many threads as devices), and a
collective holds its task's thread until every participant arrives. With several multi-device programs in flight
at once, the pool fills with participants of different programs, each waiting for a partner that has no thread
left: XLA reports "waiting for `reduce scatter` ... may be stuck" and aborts the process after 40 s. Measured on a
2-core VM with 8 emulated devices (jax 0.10.2): five ring all-reduces over overlapping device sets, issued each
iteration without waiting, stopped within 100 iterations in each of 3 runs (with CPU async dispatch on or off);
finishing each call first, 1,000 iterations ran in 2 s. A 150-step plan run reading its losses back every 10 steps
stopped the same way once in CI.

So `in_order` wraps a program over several CPU devices of this process to finish each run before the call returns
(one such program in flight; single-device programs stay asynchronous). A program over several processes' devices
(gloo on CPU, NCCL on GPU) also meets the other processes on its first run and finishes each run, see
`_CrossProcess`. GPU programs inside one process are returned unchanged: their collectives wait on streams, not on
host threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax

from meshes.distributed import meet


def processes_of(devices: Iterable[jax.Device]) -> frozenset[int]:
    return frozenset(d.process_index for d in devices)


def devices_of(shardings: Any) -> set[jax.Device]:
    """Every device of a tree of shardings (None leaves skipped)."""
    return {d for sharding in jax.tree.leaves(shardings) for d in sharding.device_set}


def in_order(program: Callable, devices: Iterable[jax.Device]) -> Callable:
    """`program` (jitted) as it must be called when it runs on `devices` (see the module docstring)."""
    devices = set(devices)
    if len(processes_of(devices)) > 1:
        return _CrossProcess(program, devices)
    if len(devices) > 1 and all(d.platform == "cpu" for d in devices):
        return _OneAtATime(program)
    return program


class _OneAtATime:
    """A program over several CPU devices of this process whose every run ends before the call returns."""

    def __init__(self, program: Any):
        self._program = program

    def __call__(self, *args: Any) -> Any:
        return jax.block_until_ready(self._program(*args))

    def lower(self, *args: Any) -> Any:
        return self._program.lower(*args)


class _CrossProcess:
    """A program over devices of several processes: its first run meets the other processes, and every run ends
    before the next cross-process program starts.

    Collectives on CPU (gloo) open a connection per device set, with a fixed 30 s rendezvous, on first run; a
    process still compiling, or still computing the inputs, would make the others miss it. So the first run waits,
    once compiled and once its inputs are ready, until every process involved reaches it (`meshes.distributed.meet`,
    which waits as long as it must); later runs reuse the connection. With several such programs in flight at once,
    two processes on 2 CPU cores stopped for good at the second step of a plan, each waiting inside a collective
    (process 0 in the dispatch of a lane copy, process 1 on the loss). Waiting for each run to finish keeps one in
    flight per process, run in the same order on every process, and removed the stop; it costs the overlap of
    cross-process copies with other work. Inputs and shardings are the same at every call (the program's key)."""

    def __init__(self, program: Any, devices: set[jax.Device]):
        self._program = program
        self._devices = devices
        self._compiled: Any = None

    def __call__(self, *args: jax.Array) -> Any:
        if self._compiled is None:
            compiled = self._program.lower(*args).compile()
            jax.block_until_ready(args)
            ids = "-".join(str(d.id) for d in sorted(self._devices, key=lambda d: d.id))
            meet(f"devices/{ids}", processes_of(self._devices))
            self._compiled = compiled
        return jax.block_until_ready(self._compiled(*args))

    def lower(self, *args: Any) -> Any:
        return self._program.lower(*args)
