"""The ``specmoe`` command: one small module per subcommand, parsing only."""

from __future__ import annotations

import sys

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
    help="Predict which MoE experts upcoming layers will use, and prefetch them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
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
