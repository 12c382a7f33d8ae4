"""`jaxhet serve`: an OpenAI-compatible HTTP server over a trained run, a Hugging Face checkpoint or a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from jaxhet.cli.errors import user_errors

DEFAULT_RUN = Path("runs/latest")


def _source(checkpoint: Path | None, model: Path | None) -> tuple[Path | None, Path | None]:
    """(run, hf_dir) to load: what was asked for, else the default `jaxhet train` run when it exists."""
    if checkpoint is None and model is None and (DEFAULT_RUN / "config.yaml").is_file():
        return DEFAULT_RUN, None
    return checkpoint, model


def serve(
    checkpoint: Annotated[
        Path | None, typer.Option(help=f"A `jaxhet train` run directory (default: {DEFAULT_RUN} when it exists).")
    ] = None,
    model: Annotated[Path | None, typer.Option(help="A local Hugging Face Llama directory instead.")] = None,
    name: Annotated[str | None, typer.Option(help="Model name clients ask for (default: the directory name).")] = None,
    plan: Annotated[
        Path | None, typer.Option(help="A serving plan JSON (`jaxhet plan serve -o`): replicas on its devices.")
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Engines on distinct local devices, without a plan.")] = 1,
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None, typer.Option(envvar="JAXHET_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/.")
    ] = None,
    kv_format: Annotated[
        str, typer.Option(help="KV cache format: float32, bfloat16, float16, int8, int4.")
    ] = "bfloat16",
    max_running: Annotated[int, typer.Option(min=1, help="Sequences decoded together at most.")] = 16,
    num_pages: Annotated[int, typer.Option(min=1, help="KV cache pages per engine.")] = 512,
    page_size: Annotated[int, typer.Option(help="Tokens per KV page: 16, 32 or 64.")] = 16,
    max_model_len: Annotated[int, typer.Option(min=2, help="Prompt plus output tokens per request at most.")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1024, help="Largest request body accepted.")] = 1 << 20,
    dtype: Annotated[str | None, typer.Option(help="Weights dtype: float32, bfloat16 or float16.")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics)."""
    console = Console()
    with user_errors():
        import planners
        from jaxhet.loading import load_model
        from jaxhet.serve import EngineConfig, ServerConfig, build_deployments, create_app

        engine_config = EngineConfig(
            max_running=max_running,
            page_size=page_size,
            num_pages=num_pages,
            kv_format=kv_format,
            max_model_len=max_model_len,
        )
        server_config = ServerConfig(api_key=api_key, max_body_bytes=max_body_bytes)
        run, hf_dir = _source(checkpoint, model)
        loaded = load_model(run=run, hf_dir=hf_dir, dtype=dtype)
        served_name = name or (Path(run or hf_dir).resolve().name if (run or hf_dir) else "jaxhet-tiny")
        serve_plan = planners.ServePlan.from_json(plan.read_text()) if plan is not None else None
        if serve_plan is not None:
            planned = sorted({replica.model for replica in serve_plan.replicas})
            if len(planned) != 1:
                raise ValueError(f"the plan serves {len(planned)} models ({planned}); jaxhet serve loads one model")
            served_name = planned[0]
        console.print(f"[dim]model: {loaded.source}; compiling the engines' shape buckets...[/]")
        deployments = build_deployments({served_name: loaded}, engine_config, replicas=replicas, plan=serve_plan)
    from jaxhet.serve.server import serve_forever

    names = ", ".join(f"{n} ({len(d.replicas)} replica{'s' * (len(d.replicas) > 1)})" for n, d in deployments.items())
    console.print(f"serving {names} on http://{host}:{port}/v1 (Ctrl-C drains and stops)")
    serve_forever(create_app(deployments, server_config), host=host, port=port)
