"""The `jaxhet` command line: one module per sub-command, registered on one Typer app.

On a machine without GPUs, the CLI emulates an 8-device cluster on CPU devices (unless XLA_FLAGS already says how
many), which must be set before JAX starts; the flag only concerns the host platform, so GPUs are unaffected.
Where no NVIDIA device exists it also picks JAX's CPU platform, so an installed CUDA plugin (the dev extra's, for
compiling kernels for sm_90a) is not started (its import still logs one line saying it found no CUDA driver).
"""

import glob
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

from typing import Annotated  # noqa: E402

import typer  # noqa: E402

from jaxhet.cli import generate, plan, profile, serve, train  # noqa: E402


def _print_version(value: bool) -> None:
    if value:
        from jaxhet import __version__

        typer.echo(f"jaxhet {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="jaxhet",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Train and serve language models with JAX on heterogeneous GPU clusters."""


app.command("generate")(generate.generate)
app.add_typer(plan.app, name="plan")
app.command("profile")(profile.profile)
app.command("train")(train.train)
app.command("serve")(serve.serve)
