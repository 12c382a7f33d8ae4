"""`jaxhet serve`: an OpenAI-compatible HTTP server over trained runs, Hugging Face checkpoints or a tiny model,
one model or several as a serving or cascade plan lays them out; with a serving plan, SIGHUP re-reads it and applies
it live (as `POST /admin/plan` does)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jaxhet.cli.errors import user_errors
from jaxhet.cli.launch import Coordinator, NumProcesses, ProcessId, join

DEFAULT_RUN = Path("runs/latest")
PLAN_FORMATS = ("jaxhet.serve_plan", "jaxhet.cascade_plan")


def _named_sources(checkpoint: Path | None, models: list[str], name: str | None) -> dict[str, Path | None]:
    """Served name -> directory to load (None: a fresh tiny model), from `--checkpoint` and `--model` entries."""
    sources: dict[str, Path | None] = {}
    for entry in models:
        served, sep, directory = entry.partition("=")
        if not sep:
            served, directory = name or Path(entry).resolve().name, entry
        if served in sources:
            raise ValueError(f"--model names {served!r} twice")
        sources[served] = Path(directory)
    if checkpoint is not None:
        sources[name or checkpoint.resolve().name] = checkpoint
    if not sources:
        default = DEFAULT_RUN if (DEFAULT_RUN / "config.yaml").is_file() else None
        sources[name or (DEFAULT_RUN.name if default else "jaxhet-tiny")] = default
    return sources


def _read_plan(path: Path):
    import planners

    text = path.read_text()
    kind = json.loads(text).get("format")
    if kind not in PLAN_FORMATS:
        raise ValueError(f"{path}: format must be one of {list(PLAN_FORMATS)}, got {kind!r}")
    return (planners.CascadePlan if kind == "jaxhet.cascade_plan" else planners.ServePlan).from_json(text)


def _replan_on_hangup(fleet, path: Path, console: Console) -> Callable[[], Awaitable[None]]:
    """What SIGHUP does: apply the serving plan now in `path` live; a plan that cannot run leaves the server as
    it was, with the reason printed."""
    from jaxhet.serve.replan import parse_plan

    async def replan() -> None:
        try:
            report = await fleet.apply(parse_plan(json.loads(path.read_text())))
        except Exception as err:  # noqa: BLE001 - any reason a plan cannot run is printed, and serving goes on
            console.print(f"[red]SIGHUP: the plan in {path} was not applied: {err}[/]", highlight=False)
        else:
            console.print(f"SIGHUP: applied {path}: {report}", highlight=False)

    return replan


def _serve_plan(plan):
    """The serving plan inside `plan` (a cascade plan's deployment), or None."""
    import planners

    return plan.deployment if isinstance(plan, planners.CascadePlan) else plan


def _multi_process_app(processes, plan, loaded, engine_config, server_config, name, decide_tokens):
    """On the endpoint process, the app over every process's replicas (and the cascade, for a cascade plan) and
    its deployments; on the others, serve their replicas to the endpoint until it stops them, then (None, {})."""
    from jaxhet.serve import create_app
    from jaxhet.serve.build import add_cascade
    from jaxhet.serve.processes import endpoint_deployments, run_worker
    from jaxhet.serve.worker import EndpointLost

    serve_plan = _serve_plan(plan)
    if not processes.runtime.is_main:
        try:
            run_worker(processes, serve_plan, loaded, engine_config)
        except EndpointLost as err:
            Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(code=1) from None
        return None, {}
    deployments, links = endpoint_deployments(processes, serve_plan, loaded, engine_config)
    if serve_plan is not plan:
        deployments = add_cascade(deployments, plan, name or "cascade", decide_tokens)
    return create_app(deployments, server_config, links=links), deployments


def _processes(plan, cluster: str | None, coordinator: str | None, num_processes: int | None, process_id: int | None):
    """This process's place in a multi-process server (None for one process): explicit options or a launcher's
    environment, over the cluster the plan's device indices refer to. Must run before JAX starts."""
    import os

    import planners
    from jaxhet.serve.processes import ServeProcesses, check_one_process
    from meshes.distributed import Launch, detect_launcher, node_processes

    launch = Launch(coordinator, num_processes, process_id)
    detected = None if launch.explicit else detect_launcher(os.environ)
    if not launch.explicit and detected is None:
        return None
    if plan is None:
        raise ValueError("a multi-process server needs --plan: it says which replicas run on which node")
    serve_plan = _serve_plan(plan)
    spec = planners.ClusterSpec.load(cluster or serve_plan.cluster)
    check_one_process(serve_plan, spec, node_processes(spec, num_processes or detected[1]))
    return ServeProcesses(join(spec, coordinator, num_processes, process_id, recoverable=True), spec)


def serve(
    checkpoint: Annotated[
        Path | None, typer.Option(help=f"A `jaxhet train` run directory (default: {DEFAULT_RUN} when it exists).")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="A model directory (Hugging Face or `jaxhet train` run), or NAME=DIR; repeat to serve several "
            "(a plan's models are matched by NAME)."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Name clients ask for: of the model (default: its directory) or the cascade.")
    ] = None,
    plan: Annotated[
        Path | None,
        typer.Option(
            help="A serving plan (`jaxhet plan serve -o`) or cascade plan (`jaxhet plan cascade -o`) JSON; SIGHUP "
            "re-reads a serving plan and applies it live."
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Engines on distinct local devices, without a plan.")] = 1,
    cascade_decide_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="With a cascade plan: a model's answer is kept or escalated on the confidence of its first this "
            "many tokens, and a kept answer then streams as it is generated.",
        ),
    ] = 16,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="JAXHET_API_KEY", help="Require `Authorization: Bearer KEY` on every path but /health."),
    ] = None,
    kv_format: Annotated[
        str, typer.Option(help="KV cache format: float32, bfloat16, float16, int8, int4.")
    ] = "bfloat16",
    max_running: Annotated[int, typer.Option(min=1, help="Sequences decoded together at most.")] = 16,
    num_pages: Annotated[int, typer.Option(min=1, help="KV cache pages per engine.")] = 512,
    page_size: Annotated[int, typer.Option(help="Tokens per KV page: 16, 32 or 64.")] = 16,
    max_model_len: Annotated[int, typer.Option(min=2, help="Prompt plus output tokens per request at most.")] = 1024,
    prefix_caching: Annotated[
        bool,
        typer.Option(
            help="Share the KV pages of common prompt prefixes (a system prompt) between requests and keep them "
            "after a request ends, so a repeated prefix is prefilled once."
        ),
    ] = True,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted.")] = 1 << 20,
    read_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds a request's headers, and then its body, may take to arrive: a connection whose headers "
            "are late is closed, a late body gets a 408.",
        ),
    ] = 10.0,
    dtype: Annotated[str | None, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")] = None,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="A Jinja chat template file for every served model, replacing the checkpoint's own; 'transcript' "
            "chats with a base model as a plain 'Role: content' transcript. Without one, a model whose checkpoint "
            "ships no template refuses chat requests."
        ),
    ] = None,
    coordinator: Coordinator = None,
    num_processes: NumProcesses = None,
    process_id: ProcessId = None,
    cluster: Annotated[
        str | None,
        typer.Option(help="With several processes: the plan's cluster (name or YAML; default: the plan's own)."),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics); with
    --coordinator/--num-processes/--process-id (or under SLURM / Open MPI), one process per node of the plan's
    cluster, process 0 the endpoint."""
    console = Console()
    with user_errors():
        import planners
        from jaxhet.loading import load_model, load_model_dir
        from jaxhet.serve import (
            EngineConfig,
            ReplicaSource,
            ServerConfig,
            build_cascade,
            build_deployments,
            create_app,
        )
        from jaxhet.serve.server import bind, serve_forever

        engine_config = EngineConfig(
            max_running=max_running,
            page_size=page_size,
            num_pages=num_pages,
            kv_format=kv_format,
            max_model_len=max_model_len,
            prefix_caching=prefix_caching,
        )
        server_config = ServerConfig(api_key=api_key, max_body_bytes=max_body_bytes, read_timeout_s=read_timeout)
        loaded_plan = _read_plan(plan) if plan is not None else None
        processes = _processes(loaded_plan, cluster, coordinator, num_processes, process_id)
        endpoint = processes is None or processes.runtime.is_main
        sock = bind(host, port) if endpoint else None  # a busy port or a foreign address is found before loading
        cascade = isinstance(loaded_plan, planners.CascadePlan)
        sources = _named_sources(checkpoint, model or [], None if cascade else name)
        if isinstance(loaded_plan, planners.ServePlan):
            planned = sorted({replica.model for replica in loaded_plan.replicas})
            if len(planned) == 1 and len(sources) == 1:
                sources = {planned[0]: next(iter(sources.values()))}
        loaded = {
            served: load_model_dir(directory, dtype=dtype, lazy=True, chat_template=chat_template)
            if directory
            else load_model(dtype=dtype, chat_template=chat_template)
            for served, directory in sources.items()
        }
        for served, model_loaded in loaded.items():
            console.print(f"[dim]{served}: {model_loaded.source}[/]")
        console.print("[dim]compiling the engines' shape buckets...[/]")
        if processes is not None:
            app, deployments = _multi_process_app(
                processes, loaded_plan, loaded, engine_config, server_config, name, cascade_decide_tokens
            )
            if app is None:
                return
        elif cascade:
            deployments = build_cascade(
                loaded, engine_config, loaded_plan, name=name or "cascade", decide_tokens=cascade_decide_tokens
            )
            app = create_app(deployments, server_config)
        else:
            deployments = build_deployments(loaded, engine_config, replicas=replicas, plan=loaded_plan)
            app = create_app(deployments, server_config, replicas=ReplicaSource(loaded, engine_config))
    assert sock is not None
    where = f"http://{host}:{sock.getsockname()[1]}/v1"
    console.print(f"serving {', '.join(deployments)} on {where} (Ctrl-C drains and stops)")
    on_hangup = None if plan is None or cascade or processes else _replan_on_hangup(app.state.fleet, plan, console)
    serve_forever(app, sock, header_timeout_s=read_timeout, on_hangup=on_hangup)
