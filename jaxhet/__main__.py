"""`python -m jaxhet ...` runs the `jaxhet` command line with this interpreter (where the script is not on PATH)."""

from jaxhet.cli import app

app(prog_name="jaxhet")
