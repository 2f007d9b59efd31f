"""The ``specmoe`` command: one small module per subcommand, parsing only."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from specmoe.cli import (
    bench,
    collect,
    corpus,
    evaluate,
    models,
    predictors,
    prepare,
    run,
    serve,
    simulate,
    traces,
    train,
)
from specmoe.errors import PeerError, SpecmoeError

app = typer.Typer(
    help="Run MoE models whose experts do not fit in memory: predict which experts the next "
    "layers will use, and prefetch them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: wraps at 80 columns without cutting option names
)


def _version(value: bool) -> None:
    if value:
        from specmoe import __version__

        typer.echo(f"specmoe {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Run MoE models whose experts do not fit in memory: predict which experts the next layers
    will use, and prefetch them. `specmoe run` runs the whole pipeline on the built-in default."""


app.command(name="run")(run.run_command)
app.command(name="report")(run.report_command)
app.command(name="collect")(collect.collect_command)
app.command(name="train")(train.train_command)
app.command(name="evaluate")(evaluate.evaluate_command)
app.command(name="simulate")(simulate.simulate_command)
app.command(name="prepare")(prepare.prepare_command)
app.command(name="serve")(serve.serve_command)
app.add_typer(predictors.app, name="predictors")
app.add_typer(models.app, name="models")
app.add_typer(traces.app, name="traces")
app.add_typer(corpus.app, name="corpus")
app.add_typer(bench.app, name="bench")


def main() -> None:
    """Entry point: library errors become one clear line and exit status 2."""
    try:
        app()
    except PeerError:
        sys.exit(2)  # rank 0 printed it
    except SpecmoeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
