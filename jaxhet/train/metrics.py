"""A run's per-step metrics, written twice: JSON lines (`metrics.jsonl`, one record per step, easy to read back)
and TensorBoard scalars (`tensorboard/`, to watch a run live with `tensorboard --logdir RUN_DIR`).

On resume, records past the restored step (written before a crash, recomputed after resuming) are dropped from
the JSONL file, and the TensorBoard writer purges them too (a purge step tells TensorBoard to discard older
events at or after it), so both show each step once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

# Record field -> TensorBoard tag. Fields that are None (MFU without a known peak) are not written.
SCALARS = {
    "loss": "train/loss",
    "lr": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "perf/tokens_per_s",
    "model_tflops": "perf/model_tflops",
    "mfu": "perf/mfu",
}


class MetricsLog:
    """Appends step records to `directory/metrics.jsonl` and `directory/tensorboard/`, continuing after `start_step`."""

    def __init__(self, directory: Path, start_step: int, *, writer: bool = True):
        """With `writer` false (every process of a multi-process run but the first) nothing is written."""
        self.jsonl_path = directory / "metrics.jsonl"
        self.tensorboard_dir = directory / "tensorboard"
        self._jsonl = self._writer = None
        if writer:
            _trim(self.jsonl_path, start_step)
            self._jsonl = self.jsonl_path.open("a")
            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step + 1, flush_secs=10)

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        with _named(self.jsonl_path):
            self._jsonl.write(json.dumps(record) + "\n")
        for field, tag in SCALARS.items():
            if record.get(field) is not None:
                self._writer.add_scalar(tag, record[field], record["step"])

    def flush(self) -> None:
        if self._writer is not None:
            with _named(self.jsonl_path):
                self._jsonl.flush()
            with _named(self.tensorboard_dir):
                self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            with _named(self.jsonl_path):
                self._jsonl.close()
            with _named(self.tensorboard_dir):
                self._writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """Close; with an error already on its way out (a full disk fails the close too), that error is kept."""
        try:
            self.close()
        except OSError:
            if exc_type is None:
                raise


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """An OSError of a buffered write names no file; raise it again naming `path`."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


def _trim(path: Path, last_step: int) -> None:
    """Drop JSONL records past `last_step`."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))
