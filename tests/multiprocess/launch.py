"""Start real JAX processes on 127.0.0.1 for multi-process tests: a free port, a timeout on every wait, and every
process killed by its PID at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Compiling is most of these processes' time on CPU, and every check compares with a reference computed in the
# same process (or by `jaxhet train --plan single`) under the same flags: LLVM's optimisation level 0 halves the
# compiler's CPU time for the tests' model (2.0 s -> 1.1 s for one step's jit; gradients move by ~5e-7 relative).
COMPILER_FLAGS = "--xla_backend_optimization_level=0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(compilation_cache: Path | None = None) -> dict[str, str]:
    """The test environment without the parent's 8-device flag (each process sets its own device count), and with
    `COMPILER_FLAGS`.

    With `compilation_cache`, JAX's persistent compilation cache in that directory, for every program however
    quick to compile: the processes of one test compile the same programs again (the same plan in every launch of
    `jaxhet train`, the same stage programs in several cases), and compiling is most of their time on CPU. JAX
    writes entries from process 0 only, so process 0's programs are the ones reused."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = COMPILER_FLAGS
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env["JAX_PLATFORMS"] = "cpu"
    if compilation_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def fast_compile_environment(compilation_cache: Path) -> dict[str, str]:
    """Environment variables that make a smoke run compile less: JAX's persistent compilation cache in
    `compilation_cache` for every program however quick to compile (some benchmarks build a program again through a
    new `jax.jit` object, e.g. bench/train.py's plan rows their stage programs for the compiled-memory figures),
    and LLVM's optimisation level 0 in `XLA_FLAGS` (compiling is most of a smoke run on CPU; its times are only
    checked to be positive, and every variant of a run compiles under the same flags). Their workers and servers
    inherit both. Only the tests set these: the benchmarks' own (GPU) runs compile as before."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "XLA_FLAGS": COMPILER_FLAGS,
    }


@contextlib.contextmanager
def processes(
    commands: Sequence[Sequence[str]], logs: Path, compilation_cache: Path | None = None
) -> Iterator[list[subprocess.Popen]]:
    """Start one process per command (stdout and stderr to `logs/process<i>.log`), in `environment`; kill all on
    exit."""
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for i, command in enumerate(commands):
            log = (logs / f"process{i}.log").open("w")
            started.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=environment(compilation_cache), cwd=ROOT
                )
            )
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def wait_all(started: Sequence[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes of every process, waiting at most `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in started]


def log_text(logs: Path, i: int) -> str:
    return (logs / f"process{i}.log").read_text()


def run(
    commands: Sequence[Sequence[str]], logs: Path, timeout: float, compilation_cache: Path | None = None
) -> list[int]:
    """Run the processes to the end; a failure's message carries every process's log tail."""
    with processes(commands, logs, compilation_cache) as started:
        try:
            codes = wait_all(started, timeout)
        except subprocess.TimeoutExpired:
            tails = "\n".join(f"--- process {i}\n{log_text(logs, i)[-3000:]}" for i in range(len(commands)))
            raise AssertionError(f"processes still running after {timeout} s\n{tails}") from None
    if any(codes):
        tails = "\n".join(f"--- process {i} (exit {c})\n{log_text(logs, i)[-3000:]}" for i, c in enumerate(codes))
        raise AssertionError(f"a process failed\n{tails}")
    return codes


def python(module_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(module_path), *args]
