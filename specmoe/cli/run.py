"""``specmoe run`` and ``specmoe report``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def run_command(
    config: Annotated[
        Path | None, typer.Option(help="YAML run config (see configs/); default: the built-in Switch model and corpus.")
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Run directory. Rerunning reuses finished stages and resumes the rest.")
    ] = Path("runs/default"),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a config value: section.key=value (YAML value).")
    ] = None,
) -> None:
    """Run the whole pipeline, resumably.

    collect → train → evaluate → simulate → offload benchmark → report, in one run directory;
    a rerun reuses finished stages and resumes the rest."""
    from specmoe.run.config import load_run_config
    from specmoe.run.pipeline import run_pipeline

    run_config = load_run_config(config, set_)
    command = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run_pipeline(run_config, out, command=command)
    typer.echo(f"report: {out / 'report.html'}\nsummary: {out / 'summary.md'} and {out / 'summary.json'}")


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A directory written by `specmoe run`.")],
) -> None:
    """Re-render a run directory's report.

    report.html and summary.md, from the stage outputs."""
    from specmoe.report.build import write_report

    typer.echo(f"report: {write_report(run_dir)}")
