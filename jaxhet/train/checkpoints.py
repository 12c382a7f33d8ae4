"""Training checkpoints with Orbax: asynchronous saves, the last k kept, and a fall-back past a broken latest one.

A checkpoint holds the parameters, the optimizer state and a JSON record of everything else a run needs to
continue exactly (step, data-iterator position, PRNG key data, the config it was written with). Orbax finalises a
step directory atomically, so a save interrupted by kill -9 never appears as a checkpoint; one damaged afterwards
fails to restore and the previous one is used, with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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
        if process is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            options.multiprocessing_options = ocp.options.MultiprocessingOptions(
                primary_host=process, active_processes={process}, barrier_sync_key_prefix=f"process{process}"
            )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start writing `state` (a pytree of arrays) and `meta` (JSON) for `step`; returns before the write ends."""
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest checkpoint that restores, as (step, state, meta); None when there is none."""
        for step in reversed(self.steps()):
            restored = self.restore_step(step, abstract_state)
            if restored is not None:
                return step, *restored
        return None

    def restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict] | None:
        """(state, meta) of `step` in `abstract_state`'s layout (None: as saved), or None, with a warning, when
        it cannot be read."""
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except Exception as err:  # noqa: BLE001 - any failure to read a checkpoint means: try the previous one
            log.warning(
                "checkpoint at step %d in %s cannot be restored (%s); trying the previous one", step, self.directory, err
            )
            return None
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
