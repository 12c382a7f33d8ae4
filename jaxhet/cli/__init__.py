"""The `jaxhet` command line: one module per sub-command, registered on one Typer app."""

from typing import Annotated

import typer

from jaxhet.cli import generate, plan


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
