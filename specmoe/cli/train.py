"""``specmoe train``."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def train_command(
    predictor: Annotated[str, typer.Option(help="Predictor name (see `specmoe predictors list`).")],
    traces: Annotated[Path, typer.Option(help="Trace store directory.")],
    out: Annotated[Path, typer.Option(help="Where to save the fitted predictor.")],
    preset: Annotated[str | None, typer.Option(help="Named preset, e.g. baseline / enhanced / improved.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (torch predictors).")] = None,
    max_steps_per_epoch: Annotated[int | None, typer.Option(help="Cap on steps per epoch (CPU budgets).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")] = False,
    seed: Annotated[int | None, typer.Option(help="Model initialisation / shuffling seed.")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the document split.")] = 0,
    param: Annotated[list[str] | None, typer.Option(help="Extra constructor argument key=value (JSON values).")] = None,
) -> None:
    """Fit an expert predictor and save it.

    On the train split, with early stopping on val."""
    from specmoe.cli.params import parse_params
    from specmoe.run.fit import fit_and_save

    overrides = parse_params(param)
    for key, value in (("epochs", epochs), ("max_steps_per_epoch", max_steps_per_epoch), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    command = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    _, info = fit_and_save(
        predictor, traces, out, preset=preset, split_seed=split_seed, resume=resume, command=command, **overrides
    )
    if info:
        typer.echo(
            f"saved {predictor} ({info['num_parameters']} parameters) to {out}; "
            f"val recall@k {info['val_recall_at_k']:.4f}"
        )
