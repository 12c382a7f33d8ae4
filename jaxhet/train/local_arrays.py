"""An Orbax item of host arrays that one process of a multi-process run writes and reads on its own.

Each process of a multi-process run keeps its own checkpoints of the shards it holds
(`jaxhet.train.process_checkpoints`). Orbax's own array handlers write only on process 0 (its numpy handler checks
`process_index() == 0` before writing), so a store of process 1 finalised its step directories with no arrays in
them, and a resumed run found nothing to restore there and started over. This handler writes the arrays as one
safetensors file in the item's directory, on whichever process calls it; Orbax's manager still makes the step
directory, finalises it atomically and keeps the last k.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from safetensors.numpy import load_file, save_file

FILE = "arrays.safetensors"


class LocalArraysHandler(ocp.CheckpointHandler):
    """Saves and restores a flat {name: numpy array} mapping held by the calling process alone."""

    def save(self, directory: epath.Path, args: LocalArraysSave) -> None:
        save_file({name: np.asarray(value, order="C") for name, value in args.arrays.items()}, str(directory / FILE))

    def restore(self, directory: epath.Path, args: LocalArraysRestore | None = None) -> dict[str, np.ndarray]:
        return load_file(str(directory / FILE))

    def metadata(self, directory: epath.Path) -> Any:
        return None


@ocp.args.register_with_handler(LocalArraysHandler, for_save=True)
@dataclasses.dataclass
class LocalArraysSave(ocp.args.CheckpointArgs):
    arrays: dict[str, np.ndarray]


@ocp.args.register_with_handler(LocalArraysHandler, for_restore=True)
@dataclasses.dataclass
class LocalArraysRestore(ocp.args.CheckpointArgs):
    pass
