"""Training checkpoints with Orbax: asynchronous saves, the last k kept, and a fall-back past a broken latest one.

A checkpoint holds the parameters, the optimizer state and a JSON record of everything else a run needs to
continue exactly (step, data-iterator position, PRNG key data, the config it was written with). Orbax finalises a
step directory atomically, so a save interrupted by kill -9 never appears as a checkpoint; one damaged afterwards
fails to restore and the previous one is used, with a warning, and the damaged one is renamed `<step>.corrupt`
(kept for inspection, out of Orbax's sight): left in place it would stay "newest", and Orbax would skip every later
save up to its step. For the same reason a save at step s first renames any checkpoint at step s or later to
`<step>.superseded`, with a warning: they belong to a run that went further before it was resumed from an earlier
step (in a multi-process run, steps some processes finalised and others did not). A save Orbax still declines, or
a write that fails (a full disk), raises `CheckpointError` naming the directory, the step and the OS's reason in one
line; the unfinished step's files are removed and the checkpoints already finalised stay as they were. Readers
(`restore_latest(..., move_aside=False)`) skip a damaged checkpoint without renaming it: the run may belong to a
trainer that is still writing it.

A trainer takes the run directory's lock (`lock()`, an advisory `flock` on `.lock` holding its PID, released when
the process ends however it ends), so a second trainer on the same directory is refused naming the first; readers
(serving, generating) take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxhet.models import CheckpointError
from jaxhet.train.local_arrays import LocalArraysHandler, LocalArraysRestore, LocalArraysSave

log = logging.getLogger(__name__)
CORRUPT_SUFFIX = ".corrupt"
SUPERSEDED_SUFFIX = ".superseded"
LOCK_FILE = ".lock"
# Orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames it to `<step>` when it is complete.
UNFINISHED_GLOB = "{step}.orbax-checkpoint-tmp*"
# TensorStore reports a failed write as text: the OS error's number and the files concerned, then its whole spec.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_ABSOLUTE_PATH = re.compile(r'"(/[^"]+)"')


class CheckpointStore:
    """The checkpoints of one run directory."""

    def __init__(self, directory: str | Path, *, keep: int, process: int | None = None):
        """With `process`, the store belongs to that process alone (one of a multi-process run's per-process
        stores, `jaxhet.train.process_checkpoints`); otherwise every process takes part in every call."""
        self.directory = Path(directory).absolute()
        # A per-process store writes synchronously: Orbax's asynchronous directory creation is signalled under
        # keys that the stores of different processes share, and a store could write into a directory not yet made.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=process is None, create=process is None
        )
        self._local = process is not None
        handlers: dict[str, ocp.CheckpointHandler] = {
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        if self._local:
            self.directory.mkdir(parents=True, exist_ok=True)
            own = ocp.options.MultiprocessingOptions(
                primary_host=process, active_processes={process}, barrier_sync_key_prefix=f"process{process}"
            )
            options.multiprocessing_options = own
            # This process's host arrays and its meta, written by this process (Orbax's defaults write on process
            # 0 only: see `jaxhet.train.local_arrays`).
            handlers = {"state": LocalArraysHandler(), "meta": ocp.JsonCheckpointHandler(multiprocessing_options=own)}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._last_save: int | None = None
        self._lock: int | None = None

    def lock(self) -> None:
        """Claim the run directory for this process; CheckpointError naming the PID that holds it already."""
        descriptor = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise CheckpointError(
                f"{self.directory} is in use by another trainer (process {holder}); wait for it or choose another "
                f"checkpoint_dir"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._lock = descriptor

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start writing `state` (a pytree of arrays) and `meta` (JSON) for `step`; returns before the write ends.

        Checkpoints at this step or later are moved aside first; CheckpointError if Orbax declines all the same or a
        write fails."""
        self.wait()  # Orbax waits for the previous save anyway; its failure is named by its own step here
        saved_state = LocalArraysSave(state) if self._local else ocp.args.StandardSave(state)
        args = ocp.args.Composite(state=saved_state, meta=ocp.args.JsonSave(meta))
        with self._failures_named(step):
            for later in [s for s in self.steps() if s >= step]:
                self._move_aside(later, SUPERSEDED_SUFFIX, f"a save at step {step} supersedes it")
            saved = self._manager.save(step, args=args)
        self._last_save = step
        if not saved:
            raise CheckpointError(f"Orbax did not save step {step} in {self.directory} (it holds {self.steps()})")

    def wait(self) -> None:
        """Block until the last save is on disk; CheckpointError if its write failed."""
        with self._failures_named(self._last_save):
            self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _failures_named(self, step: int | None) -> Iterator[None]:
        """Any failure of Orbax's while saving `step` as one CheckpointError naming the run directory, the step and
        the reason; the step's unfinished files are removed, so a failed save leaves the disk as it found it."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - every way a write fails is the same failure to the caller
            for unfinished in self.directory.glob(UNFINISHED_GLOB.format(step=step)):
                shutil.rmtree(unfinished, ignore_errors=True)
            raise CheckpointError(f"saving step {step} in {self.directory} failed: {failure_reason(err)}") from err

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any, *, move_aside: bool = True) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores, as (step, state, meta); None when there is none. Each newer one
        that fails is moved aside (unless `move_aside` is false: a reader's call), so that saves of its step and
        below land again."""
        for step in reversed(self.steps()):
            restored = self.restore_step(step, abstract_state)
            if restored is not None:
                return step, *restored
            if move_aside:
                self.set_aside(step)
        return None

    def set_aside(self, step: int) -> None:
        """Move the damaged checkpoint of `step` to `<step>.corrupt`, out of Orbax's sight, with a warning."""
        self._move_aside(step, CORRUPT_SUFFIX, "it cannot be restored")

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict] | None:
        """(state, meta) of `step` in `abstract_state`'s layout (None: as saved), or None, with a warning, when
        it cannot be read."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=self._state_restore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except Exception as err:  # noqa: BLE001 - any failure to read a checkpoint means: try the previous one
            log.warning(
                "checkpoint at step %d in %s cannot be restored (%s); trying the previous one",
                step,
                self.directory,
                err,
            )
            return None
        return restored["state"], restored["meta"]

    def _state_restore(self, abstract_state: Any) -> ocp.args.CheckpointArgs:
        return LocalArraysRestore() if self._local else ocp.args.StandardRestore(abstract_state)

    def _move_aside(self, step: int, suffix: str, why: str) -> None:
        """Rename the checkpoint of `step` to `<step><suffix>` (or `<suffix>-2`, ...) out of Orbax's sight, with a
        warning saying `why`."""
        source = self.directory / str(step)
        target = source.with_name(source.name + suffix)
        for attempt in itertools.count(2):
            if not target.exists():
                break
            target = source.with_name(f"{source.name}{suffix}-{attempt}")
        source.rename(target)
        self._manager.reload()
        log.warning("moved the checkpoint at step %d in %s to %s: %s", step, self.directory, target.name, why)

    def close(self) -> None:
        """Finish the last save (CheckpointError if it failed) and release Orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()
            if self._lock is not None:
                os.close(self._lock)  # closing the descriptor releases the flock
                self._lock = None


def failure_reason(err: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason and the file for a failed write (TensorStore's spec dump
    dropped), otherwise the error's first line."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror + (f" ({cause.filename})" if cause.filename else "")
        cause = cause.__cause__ or cause.__context__
    text = str(err).strip()
    code = _OS_ERROR_CODE.search(text)
    if code is not None:
        paths = _ABSOLUTE_PATH.findall(text)
        return os.strerror(int(code.group(1))) + (f" (writing {paths[0]})" if paths else "")
    return text.splitlines()[0].split(" [tensorstore_spec=")[0] if text else type(err).__name__
