"""``specmoe predictors list``."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(help="Expert predictors.", no_args_is_help=True)


@app.command("list")
def list_predictors(
    num_layers: Annotated[int, typer.Option(help="Model shape used to count parameters.")] = 6,
    num_experts: Annotated[int, typer.Option()] = 128,
    top_k: Annotated[int, typer.Option()] = 1,
) -> None:
    """Every predictor and preset, with its parameter count for the given model shape."""
    from specmoe.predictors.registry import PREDICTORS, PRESETS, predictor_class
    from specmoe.predictors.sizes import parameter_count

    predictor_class("popularity")  # registers the neural families
    typer.echo(f"parameters for L={num_layers} MoE layers, E={num_experts} experts, k={top_k}:")
    for name in sorted(PREDICTORS):
        doc = ((PREDICTORS[name].__doc__ or "").strip().splitlines() or [""])[0]
        for preset in [None, *sorted(PRESETS.get(name, {}))]:
            label = name if preset is None else f"{name}:{preset}"
            count = parameter_count(name, preset, num_layers, num_experts, top_k)
            typer.echo(f"  {label:<22} {count:>14}  {doc if preset is None else ''}")
