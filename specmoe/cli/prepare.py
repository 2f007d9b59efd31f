"""``specmoe prepare``: write a checkpoint's expert store once, for offloaded runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def prepare_command(
    model: Annotated[str, typer.Argument(help="Hub id, local checkpoint directory or built-in model name.")],
    store: Annotated[
        Path | None,
        typer.Option(help="Where the store goes (default: the cache, $SPECMOE_CACHE or ~/.cache/specmoe/experts)."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's own).")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run the checkpoint's own Python code (only for checkpoints you trust).")
    ] = False,
) -> None:
    """Write a checkpoint's expert store, once.

    Streams the checkpoint expert by expert into an aligned expert store (memory: one
    expert), kept for every later `serve`, `bench offload --model` and `collect --offload`
    of this checkpoint. A finished, current store is reused; a stale or half-written one is
    rebuilt."""
    from specmoe.models.offloaded import load_offloaded
    from specmoe.offload.live.expert_store import prepare_store

    offloaded = load_offloaded(model, dtype=dtype, trust_remote_code=trust_remote_code)
    files = prepare_store(offloaded, store, log=typer.echo)
    layers = len(offloaded.loaded.layers)
    size = sum(files.expert_nbytes(g) for g in range(layers)) * offloaded.loaded.num_experts
    typer.echo(
        f"{files.directory}: {layers} MoE layers x {offloaded.loaded.num_experts} experts, {size / 2**30:.2f} GiB "
        f"in {str(offloaded.dtype).removeprefix('torch.')}; non-expert weights {offloaded.non_expert_nbytes() / 2**20:.0f} MiB"
    )
