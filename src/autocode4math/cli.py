"""The `autocode` command line: one typer app, one thin command per entry point.

Each command's options are its function's signature and its help is the docstring. Heavy imports
(torch, transformers) happen inside the commands so that `autocode --help` and the sandbox stay fast.
"""

from __future__ import annotations

import typer

from autocode4math import __version__

app = typer.Typer(
    name="autocode",
    help="Teach math LMs when to write and run code, and measure how well any model makes that choice.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks that print figures (throughput, latency, utilisation).", no_args_is_help=True)
toy_app = typer.Typer(help="The embedded synthetic math world and its tiny models.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(toy_app, name="toy")


@app.command()
def version() -> None:
    """Print the package version."""
    typer.echo(__version__)


# --- sandbox (exec, bench sandbox) ---

# --- benchmarks and grading (grade) ---

# --- rollouts and evaluation (eval) ---

# --- toy world (toy ...) ---

# --- training (estep, mstep, train, demo) ---
