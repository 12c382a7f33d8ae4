"""The options every multi-process command shares, and joining the run they describe (`meshes.distributed`)."""

from __future__ import annotations

from typing import Annotated

import typer

Coordinator = Annotated[
    str | None,
    typer.Option(help="HOST:PORT of process 0's coordinator, for one process per node (with the next two)."),
]
NumProcesses = Annotated[int | None, typer.Option(min=1, help="How many processes the run has.")]
ProcessId = Annotated[int | None, typer.Option(min=0, help="This process's id, 0 .. num-processes - 1.")]


def join(
    cluster,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    recoverable: bool = False,
):
    """This process's `meshes.distributed.Runtime`: explicit options, a detected launcher (SLURM, Open MPI), or
    one process. `recoverable`: the others go on when a process dies (serving), instead of all stopping."""
    from meshes.distributed import Launch, start

    return start(cluster, Launch(coordinator, num_processes, process_id, recoverable=recoverable))
