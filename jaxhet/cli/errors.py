"""Turn a user mistake into one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from jaxhet.models import CheckpointError, ConfigError

# OSError covers what the machine refuses: a busy port, a missing or unwritable path, a full disk. Each names what
# it concerns, which is all a user needs to fix it.
USER_ERRORS = (CheckpointError, ConfigError, OSError, ValueError)
# Libraries that log their own view of a failure they also raise (Orbax through absl, asyncio's tasks it left behind).
LIBRARY_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None


def check_output(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output file that could not be written: its folder missing or not writable."""
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a file")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable")


def quiet_library_logs() -> None:
    """For the rest of this command, keep libraries' own reports of a failure off the terminal, so a failure that
    reaches the user as one `user_errors` line is not buried under hundreds of lines of the same failure seen from
    inside: Orbax logs every failed background write with its traceback (through absl), asyncio logs the tasks it
    left unfinished (when the process exits), and TensorStore's callbacks into a closed event loop end as unraisable
    "Event loop is closed" errors. Other unraisable errors, and jaxhet's own warnings, still show. A command-line
    entry point's setting: it lasts until the process exits, which is when asyncio reports."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    report = sys.unraisablehook

    def hook(unraisable) -> None:
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            report(unraisable)

    sys.unraisablehook = hook
