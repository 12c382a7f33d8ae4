"""Turn a user mistake into one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console

from jaxhet.models import CheckpointError, ConfigError

# OSError covers what the machine refuses: a busy port, a missing or unwritable path, a full disk. Each names what
# it concerns, which is all a user needs to fix it.
USER_ERRORS = (CheckpointError, ConfigError, OSError, ValueError)


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
