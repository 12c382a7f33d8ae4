"""Checkpoints of a multi-process run: every process writes the shards it holds, and reads them back.

Orbax refuses to save, in a multi-process run, an array whose devices all belong to one process, and that is what
a heterogeneous plan's state is made of (each stage's parameters live on one node). So each process writes its own
unique shards (as host arrays, through its own Orbax manager, under `directory/process-<i>/`), with a record of
which shard of which leaf each one is. Resuming reads them back into the same layout (a resumed run reuses its
saved plan); a step counts only when every process finalised it, and every process must restore the same step,
so a damaged step on one process sends all of them to the previous one. `gather_state` puts the whole state
together from every process's files, for one-process readers (`load_trained`, serving).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxhet.train.checkpoints import CheckpointStore
from meshes.distributed import Runtime, all_texts
from meshes.transfer import empty_array, is_local

SHARDS_FILE = "shards.json"


def _process_dir(directory: Path, process: int) -> Path:
    return directory / f"process-{process}"


def _bounds(index: tuple[slice, ...], shape: Sequence[int]) -> list[list[int]]:
    return [[s.start or 0, shape[i] if s.stop is None else s.stop] for i, s in enumerate(index)]


def _local_shards(state: Any) -> tuple[dict[str, np.ndarray], list[dict]]:
    """This process's unique shards of every leaf: {name: host copy} and, per name, which leaf and where."""
    arrays, record = {}, []
    for n, leaf in enumerate(jax.tree.leaves(state)):
        seen = set()
        for shard in leaf.addressable_shards:
            bounds = _bounds(shard.index, leaf.shape)
            if str(bounds) in seen:
                continue
            seen.add(str(bounds))
            name = f"leaf{n:05d}_shard{len(seen) - 1}"
            arrays[name] = np.asarray(shard.data)
            record.append({"name": name, "leaf": n, "bounds": bounds})
    return arrays, record


def _finalised_steps(directory: Path) -> set[int]:
    return {int(p.name) for p in directory.iterdir() if p.name.isdigit()} if directory.is_dir() else set()


class ProcessCheckpoints:
    """`CheckpointStore`'s interface for a multi-process run (see the module docstring)."""

    def __init__(self, directory: str | Path, *, keep: int, runtime: Runtime):
        self.directory = Path(directory).absolute()
        self.runtime = runtime
        self._own = CheckpointStore(
            _process_dir(self.directory, runtime.process_id), keep=keep, process=runtime.process_id
        )

    def lock(self) -> None:
        """Claim this process's store (`CheckpointStore.lock`)."""
        self._own.lock()

    def save(self, step: int, state: Any, meta: dict) -> None:
        arrays, record = _local_shards(state)
        self._own.save(step, arrays, {**meta, "shards": record, "process": self.runtime.process_id})

    def steps(self) -> list[int]:
        """Steps every process finalised."""
        per_process = [_finalised_steps(_process_dir(self.directory, p)) for p in range(self.runtime.num_processes)]
        return sorted(set.intersection(*per_process))

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """The newest step every process restores, into `abstract_state`'s layout; None when there is none."""
        for step in reversed(self.steps()):
            restored = self._own.restore_step(step, None)
            if all(
                ok == "1" for ok in all_texts(f"restore/{step}", "1" if restored is not None else "0", self.runtime)
            ):
                arrays, meta = restored
                return step, _place(abstract_state, arrays, meta["shards"]), meta
        return None

    def wait(self) -> None:
        self._own.wait()

    def close(self) -> None:
        self._own.close()


def _place(abstract_state: Any, arrays: dict[str, np.ndarray], record: list[dict]) -> Any:
    """Leaves of `abstract_state`'s layout filled, device by device, from this process's saved shards."""
    by_leaf: dict[int, dict[str, np.ndarray]] = {}
    for entry in record:
        by_leaf.setdefault(entry["leaf"], {})[str(entry["bounds"])] = arrays[entry["name"]]
    leaves, treedef = jax.tree.flatten(abstract_state)
    placed = []
    for n, leaf in enumerate(leaves):
        saved = by_leaf.get(n, {})
        if not is_local(leaf.sharding):  # jax calls the callback even for a leaf held only by other processes
            placed.append(empty_array(leaf.shape, leaf.dtype, leaf.sharding))
            continue
        placed.append(
            jax.make_array_from_callback(
                leaf.shape,
                leaf.sharding,
                lambda index, s=saved, shape=leaf.shape: s[str(_bounds(index, shape))],
                dtype=leaf.dtype,
            )
        )
    return jax.tree.unflatten(treedef, placed)


def is_process_checkpointed(directory: str | Path) -> bool:
    return _process_dir(Path(directory), 0).is_dir()


def gather_state(directory: str | Path, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """The newest step every process finalised, put together from all processes' shards into `abstract_state`'s
    layout (in this one process); None when there is none."""
    directory = Path(directory).absolute()
    processes = sorted(int(p.name.split("-")[1]) for p in directory.glob("process-*"))
    stores = [CheckpointStore(_process_dir(directory, p), keep=1_000_000) for p in processes]
    common = set.intersection(*(_finalised_steps(_process_dir(directory, p)) for p in processes))
    leaves, treedef = jax.tree.flatten(abstract_state)
    for step in sorted(common, reverse=True):
        parts = [store.restore_step(step, None) for store in stores]
        if any(p is None for p in parts):
            continue
        full = [np.zeros(leaf.shape, leaf.dtype) for leaf in leaves]
        for arrays, meta in parts:
            for entry in meta["shards"]:
                full[entry["leaf"]][tuple(slice(a, b) for a, b in entry["bounds"])] = arrays[entry["name"]]
        placed = [jax.device_put(value, leaf.sharding) for value, leaf in zip(full, leaves, strict=True)]
        return step, jax.tree.unflatten(treedef, placed), parts[0][1]
    return None
