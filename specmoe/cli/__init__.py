"""The ``specmoe`` command: one small module per subcommand, parsing only."""

from __future__ import annotations

import os
import signal
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
from specmoe.errors import PeerError, SpecmoeError, os_error_message

DEBUG_ENV = "SPECMOE_DEBUG"

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
    debug: Annotated[
        bool, typer.Option("--debug", envvar=DEBUG_ENV, help=f"Show the traceback of an error (also {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """Run MoE models whose experts do not fit in memory: predict which experts the next layers
    will use, and prefetch them. `specmoe run` runs the whole pipeline on the built-in default."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


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


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "False")


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: temporary directories are removed


def _fail(message: str, status: int) -> None:
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # a bar cut short would swallow the start of the line
        bar.close()
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    sys.exit(status)


def main() -> None:
    """Entry point: every failure becomes one line on stderr and a non-zero status
    (2: bad input, data or environment; 1: a bug; 130: interrupted); ``--debug`` or
    ``SPECMOE_DEBUG=1`` shows the traceback instead."""
    from specmoe.storage.scratch import sweep_stale

    signal.signal(signal.SIGTERM, _on_sigterm)
    sweep_stale()  # what killed runs left in the project's temporary directory
    try:
        status = app(standalone_mode=False)  # typer turns Ctrl-C into the status 130
    except (typer.Abort, typer.exceptions.TyperException) as exc:  # usage errors: click's own message
        if hasattr(exc, "show"):
            exc.show()
        sys.exit(getattr(exc, "exit_code", 1))
    except PeerError:
        sys.exit(2)  # under torchrun: rank 0 printed it
    except Exception as exc:
        if _debugging():
            raise
        if isinstance(exc, SpecmoeError):
            _fail(str(exc), 2)
        if isinstance(exc, OSError):
            _fail(os_error_message(exc), 2)
        _fail(
            f"unexpected {type(exc).__name__}: {exc} (a bug: rerun with --debug or {DEBUG_ENV}=1 "
            "for the traceback, and report it)",
            1,
        )
    if status == 130:
        typer.secho("interrupted: finished work is kept; rerun the same command to resume", err=True)
    if isinstance(status, int) and status:
        sys.exit(status)
