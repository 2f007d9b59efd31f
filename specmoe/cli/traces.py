"""``specmoe traces info`` and ``specmoe traces verify``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Inspect trace stores.", no_args_is_help=True)


@app.command("info")
def info(
    directory: Annotated[Path, typer.Argument(help="Trace store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Summary of a trace store and per-layer expert-usage statistics (checksums verified)."""
    from specmoe.traces.stats import store_summary
    from specmoe.traces.store import TraceStore

    summary = store_summary(TraceStore.open(directory, verify_checksums=True))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key in (
        "path",
        "model",
        "model_type",
        "stacks",
        "num_experts",
        "top_k",
        "num_tokens",
        "num_documents",
        "num_shards",
        "complete",
        "hidden_states",
        "seq_len",
    ):
        typer.echo(f"{key:>14}: {summary[key]}")
    chance = summary["chance_top1"]
    for stack, stats in summary["statistics"].items():
        typer.echo(f"\n[{stack}] per-layer expert usage (entropy in bits; max {_log2(summary['num_experts']):.2f})")
        typer.echo(
            f"{'layer':>5} {'entropy':>8} {'norm':>6} {'top share':>9} {'unused':>6} {'dropped':>7}"
            f" {'MI(l,l+1)':>9} {'next acc':>8} {'popular':>7} {'chance':>7}"
        )
        for row in stats["layers"]:
            tail = (
                (
                    f" {row['next_layer_mi_bits']:>9.3f} {row['next_layer_top1_acc']:>8.3f}"
                    f" {row['next_layer_popularity_acc']:>7.3f} {chance:>7.4f}"
                )
                if "next_layer_mi_bits" in row
                else ""
            )
            typer.echo(
                f"{row['layer']:>5} {row['usage_entropy_bits']:>8.3f} {row['usage_entropy_normalized']:>6.3f}"
                f" {row['most_used_share']:>9.3f} {row['experts_never_used']:>6} {row['drop_rate']:>7.3f}{tail}"
            )


def _log2(x: int) -> float:
    import math

    return math.log2(x)


@app.command("verify")
def verify(directory: Annotated[Path, typer.Argument(help="Trace store directory.")]) -> None:
    """Check every shard against the manifest's sizes and SHA-256 checksums, and decode it."""
    from specmoe.traces.store import TraceStore

    store = TraceStore.open(directory, verify_checksums=True)
    for index in range(len(store.manifest.shards)):
        for stack in store.stacks:
            store.read_shard(index, stack)
    typer.echo(f"ok: {len(store.manifest.shards)} shards, {store.manifest.num_tokens} tokens")
