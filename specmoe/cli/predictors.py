"""``specmoe predictors list``."""

from __future__ import annotations

import re
import textwrap
from typing import Annotated

import typer

app = typer.Typer(help="Expert predictors.", no_args_is_help=True, rich_markup_mode=None)


@app.command("list")
def list_predictors(
    num_layers: Annotated[int, typer.Option(help="Model shape used to count parameters.")] = 6,
    num_experts: Annotated[int, typer.Option(help="Experts per MoE layer of the model shape counted for.")] = 128,
    top_k: Annotated[int, typer.Option(help="Experts each token is routed to.")] = 1,
) -> None:
    """List predictors and presets.

    Every predictor and preset, with its parameter count for the given model shape."""
    from specmoe.predictors.registry import PREDICTORS, PRESETS, predictor_class
    from specmoe.predictors.sizes import parameter_count

    predictor_class("popularity")  # registers the neural families
    typer.echo(f"predictor[:preset] and its parameters for L={num_layers} MoE layers, E={num_experts}, k={top_k}:")
    for name in sorted(PREDICTORS):
        for preset in [None, *sorted(PRESETS.get(name, {}))]:
            label = name if preset is None else f"{name}:{preset}"
            typer.echo(f"  {label:<22} {parameter_count(name, preset, num_layers, num_experts, top_k)}")
        typer.echo(
            textwrap.fill(
                _first_sentence(PREDICTORS[name].__doc__), 80, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
        )


def _first_sentence(doc: str | None) -> str:
    """A docstring's first sentence, as plain text."""
    text = re.sub(r"``([^`]*)``", r"\1", " ".join((doc or "").split()))
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return match.group(1) if match else text
