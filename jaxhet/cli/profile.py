"""`jaxhet profile`: measure this machine's devices and write the profile the cost model reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from jaxhet.cli.errors import check_output, user_errors
from jaxhet.cli.launch import Coordinator, NumProcesses, ProcessId, join
from planners.measured import MeasuredProfile


def _table(profile: MeasuredProfile) -> Table:
    table = Table(title=f"{profile.num_devices} x {profile.device} as {profile.kind}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for dtype, value in profile.matmul_tflops.items():
        table.add_row(f"matmul {dtype}", f"{value:.3g} TFLOP/s")
    for dtype, value in profile.attention_tflops.items():
        table.add_row(f"attention {dtype}", f"{value:.3g} TFLOP/s")
    table.add_row("device memory bandwidth", f"{profile.memory_bw_gb_s:.3g} GB/s")
    usable = "not reported" if profile.usable_memory_gb is None else f"{profile.usable_memory_gb:.1f} GB usable"
    table.add_row("device memory", f"{profile.memory_gb:.1f} GB, {usable}")
    table.add_row("host -> device", f"{profile.host_to_device_gb_s:.3g} GB/s")
    table.add_row("device -> host", f"{profile.device_to_host_gb_s:.3g} GB/s")
    if profile.link is not None:
        table.add_row("all-reduce link", f"{profile.link.gb_s:.3g} GB/s, {profile.link.latency_us:.3g} us")
    table.add_row(f"block efficiency ({profile.dtype})", f"{profile.compute_efficiency:.3f} of matmul peak")
    table.add_row("per-block overhead", f"{profile.layer_overhead_us:.1f} us")
    return table


def profile(
    output: Annotated[Path, typer.Option("-o", "--output", help="Write the profile JSON here.")] = Path("profile.json"),
    scale: Annotated[
        str | None, typer.Option(help="Problem sizes: tiny, small or full (default: full on GPUs, small on CPUs).")
    ] = None,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="Dtype to measure (repeat); the first is the one models run in (default bfloat16 on "
            "GPUs, float32 on CPUs)."
        ),
    ] = None,
    devices: Annotated[int | None, typer.Option(min=1, help="Use the first N local devices (default: all).")] = None,
    kind: Annotated[
        str | None, typer.Option(help="GPU kind the figures are for (default: from the device's name).")
    ] = None,
    coordinator: Coordinator = None,
    num_processes: NumProcesses = None,
    process_id: ProcessId = None,
) -> None:
    """Measure this machine's devices (matmul and attention throughput, memory, host and collective bandwidth,
    timed training steps) and write a profile that calibrates the cost model: `jaxhet plan ... --device-profile
    FILE`, or `planners.MeasuredProfile.load(FILE).apply(cluster)`.

    Run on every node of a cluster at once (--coordinator/--num-processes/--process-id, or SLURM / Open MPI):
    each process measures its own machine's devices and process I > 0 writes OUTPUT with `.processI` before its
    suffix."""
    import jax

    from jaxhet import profiling

    console = Console()
    with user_errors():
        runtime = join(None, coordinator, num_processes, process_id)
        if runtime.process_id:
            output = output.with_name(f"{output.stem}.process{runtime.process_id}{output.suffix}")
        check_output(output, "--output")
        local = jax.local_devices()[:devices] if devices else jax.local_devices()
        sizes = profiling.ProfileSizes.preset(scale or profiling.default_scale(local[0]))
        dtypes = dtype or (["float32"] if local[0].platform == "cpu" else ["bfloat16", "float16", "float32"])
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("starting", total=profiling.step_count(sizes, dtypes))
            started = False

            def on_step(label: str) -> None:
                nonlocal started
                progress.update(task, description=label, advance=1 if started else 0)
                started = True

            measured = profiling.measure(local, sizes, dtypes, kind, on_step)
            progress.update(task, advance=1)
    console.print(_table(measured))
    with user_errors():
        measured.save(output)
    console.print(f"profile written to {output}", highlight=False)
