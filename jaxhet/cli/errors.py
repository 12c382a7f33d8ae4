"""Turn a user mistake into one clear line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(code=2) from None
