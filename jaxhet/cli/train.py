"""`jaxhet train`: train a Llama-family model on a plan from the planner, with checkpoints and progress."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from jaxhet.cli.errors import quiet_library_logs, user_errors
from jaxhet.cli.launch import Coordinator, NumProcesses, ProcessId, join


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value (e.g. data.seq_len=64), got {pair!r}")
        out[key] = value
    return out


def _percent(mfu: float | None) -> str:
    """MFU for display; "n/a" where the devices have no catalogued peak (CPUs, emulated clusters)."""
    return "n/a (no GPU peak)" if mfu is None else f"{100 * mfu:.1f}%"


def save_loss_curve(metrics_path: Path, png_path: Path) -> Path:
    """Plot the loss of every step recorded in a run's metrics file."""
    import json

    from matplotlib.figure import Figure

    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return png_path


def train(
    config: Annotated[Path | None, typer.Option(help="YAML config file; fields not given keep their defaults.")] = None,
    plan: Annotated[
        str | None, typer.Option(help="auto (ask the planner), single (one device), or a plan JSON.")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Train until this step.")] = None,
    checkpoint_dir: Annotated[str | None, typer.Option(help="Run directory for checkpoints and metrics.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in the run directory.")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config field, e.g. --set data.seq_len=64.")
    ] = None,
    coordinator: Coordinator = None,
    num_processes: NumProcesses = None,
    process_id: ProcessId = None,
) -> None:
    """Train on the embedded corpus (or your data) over an emulated heterogeneous cluster, with checkpoints.

    On several machines, run the same command on each with --coordinator, --num-processes and --process-id (or
    under SLURM / Open MPI, which are detected): node i of the cluster file runs on process i."""
    with user_errors():
        from jaxhet.train import TrainConfig
        from jaxhet.train.config import check_writable_directory

        overrides = _overrides(set_ or [])
        for key, value in (("plan", plan), ("steps", steps), ("checkpoint_dir", checkpoint_dir)):
            if value is not None:
                overrides[key] = str(value)
        cfg = TrainConfig.load(config, overrides)
        check_writable_directory("checkpoint_dir", Path(cfg.checkpoint_dir))
        runtime = _join(cfg, coordinator, num_processes, process_id)
    result = _run(cfg, resume, runtime)
    if runtime.is_main:
        _summary(result)
    if result.interrupted:
        raise typer.Exit(code=130)


def _join(cfg, coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Join the run; a plan's cluster decides which devices each process emulates or must have."""
    from planners import ClusterSpec

    cluster = None if cfg.plan == "single" else ClusterSpec.load(cfg.cluster)
    return join(cluster, coordinator, num_processes, process_id)


def _batches(data) -> str:
    """The batch shape, for the first line of a run."""
    if data.length_buckets is None:
        return f"batch {data.batch_size}x{data.seq_len} tokens"
    lengths = ", ".join(map(str, data.length_buckets))
    return f"batches of {data.batch_tokens} tokens in length buckets {lengths}"


def _run(cfg, resume: bool, runtime):
    """Train, with a progress bar on process 0 (the others train silently)."""
    from jaxhet.train import train as run_training

    console = Console(quiet=not runtime.is_main)
    quiet_library_logs()
    with user_errors():
        where = cfg.cluster if cfg.plan == "auto" else cfg.plan
        console.print(
            f"[dim]training {cfg.model} for {cfg.steps} steps, {_batches(cfg.data)}, plan {cfg.plan} on {where}; "
            f"run directory {cfg.checkpoint_dir}[/]"
        )
        columns = (
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  {task.fields[rate]:,.0f} tok/s  MFU {task.fields[mfu]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress_bar:
            task = progress_bar.add_task("train", total=cfg.steps, loss=float("nan"), rate=0.0, mfu=_percent(None))

            def on_step(record: dict) -> None:
                rate = record["tokens"] / max(record["seconds"], 1e-9)
                progress_bar.update(
                    task, completed=record["step"], loss=record["loss"], rate=rate, mfu=_percent(record["mfu"])
                )

            result = run_training(cfg, resume=resume, progress=on_step, runtime=runtime)
    return result


def _summary(result) -> None:
    console = Console()
    curve = save_loss_curve(result.checkpoint_dir / "metrics.jsonl", result.checkpoint_dir / "loss.png")
    table = Table(title="jaxhet train", show_header=False)
    table.add_row(
        "steps", f"{result.start_step} → {result.end_step}" + (" (stopped early)" if result.interrupted else "")
    )
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        table.add_row("loss", f"{first:.3f} → {last:.3f} ({100 * (first - last) / first:.0f}% lower)")
        table.add_row(
            "throughput",
            f"{result.tokens:,} tokens in {result.seconds:.1f}s = {result.tokens / result.seconds:,.0f} tok/s",
        )
        table.add_row(
            "model FLOPs",
            f"{result.model_flops / result.seconds / 1e12:.3g} TFLOP/s, MFU {_percent(result.mfu)}",
        )
    table.add_row("plan", result.plan)
    if result.bucket_tokens_per_s:
        rates = ", ".join(f"{b}: {rate:,.0f}" for b, rate in result.bucket_tokens_per_s.items())
        table.add_row("tok/s per bucket", rates)
    table.add_row("checkpoints", str(result.checkpoint_dir))
    table.add_row("loss curve", str(curve))
    table.add_row("TensorBoard", f"tensorboard --logdir {result.tensorboard_dir}")
    console.print(table)
