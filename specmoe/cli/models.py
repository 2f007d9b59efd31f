"""``specmoe models list``, ``train-builtin`` and ``random-checkpoint``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Supported model families and the built-in models.", no_args_is_help=True, rich_markup_mode=None)


@app.command("list")
def list_models() -> None:
    """List the supported families and built-in models.

    Families by their config model_type."""
    from specmoe.models.builtin.specs import BUILTIN_SPECS, DEFAULT_BUILTIN
    from specmoe.models.registry import ADAPTERS

    typer.echo("Supported families (config model_type -> adapter):")
    for adapter in ADAPTERS:
        typer.echo(f"  {', '.join(adapter.model_types):<28} {adapter.family}")
    typer.echo("\nBuilt-in models (use the name wherever a model id is expected):")
    for name, spec in BUILTIN_SPECS.items():
        state = "ready" if (spec.path / "config.json").exists() else "missing weights"
        default = " (default)" if name == DEFAULT_BUILTIN else ""
        typer.echo(f"  {name:<14} {spec.description} [{state}]{default}")


@app.command("train-builtin")
def train_builtin_command(
    name: Annotated[str, typer.Argument(help="Built-in model name.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps (16 windows of 128 tokens each).")] = 1200,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: the packaged location).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = 0,
) -> None:
    """Retrain a built-in model on the shipped corpus.

    On CPU, in minutes."""
    from specmoe.errors import InputError
    from specmoe.models.builtin.specs import BUILTIN_SPECS
    from specmoe.models.builtin.train import TrainSettings, train_builtin

    if name not in BUILTIN_SPECS:
        raise InputError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_SPECS)}")
    path = train_builtin(name, TrainSettings(steps=steps, seed=seed), out)
    typer.echo(f"saved {name} to {path}")


@app.command("random-checkpoint")
def random_checkpoint_command(
    shape: Annotated[
        str,
        typer.Argument(
            help="A real model's shape (olmoe-1b-7b, mixtral-8x7b, qwen3-30b-a3b, qwen1.5-moe-a2.7b, "
            "deepseek-v2-lite) or a family's model_type (its transformers default config)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="New directory for the checkpoint.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Config field=value (YAML), e.g. num_hidden_layers=4; repeatable."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "bfloat16",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Write a random-weight checkpoint of a real shape.

    One decoder layer at a time, never holding the model: a model larger than memory to
    test offloading with."""
    import yaml

    from specmoe.errors import InputError
    from specmoe.models.random_checkpoint import write_random_checkpoint

    overrides = {}
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set expects field=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = write_random_checkpoint(shape, out, overrides=overrides, dtype=dtype, seed=seed)
    typer.echo(f"wrote {path}")
