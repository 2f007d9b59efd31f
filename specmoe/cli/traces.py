"""``specmoe traces info``, ``verify``, ``query`` and ``merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Inspect, query and merge trace stores.", no_args_is_help=True, rich_markup_mode=None)


@app.command("info")
def info(
    directory: Annotated[Path, typer.Argument(help="Trace store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Summarise a trace store.

    Per-layer expert-usage statistics (checksums verified)."""
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
    """Check a store's files and decode them.

    Every shard against the manifest's sizes and SHA-256 checksums."""
    from specmoe.traces.store import TraceStore

    store = TraceStore.open(directory, verify_checksums=True)
    for index in range(len(store.manifest.shards)):
        for stack in store.stacks:
            store.read_shard(index, stack)
    typer.echo(f"ok: {len(store.manifest.shards)} shards, {store.manifest.num_tokens} tokens")


@app.command("query")
def query(
    directory: Annotated[Path, typer.Argument(help="Trace store directory.")],
    sql: Annotated[str, typer.Argument(help="An example query (expert_usage, coactivation) or a .sql file.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Query variable name=value, e.g. layer_a=2. Repeatable.")
    ] = None,
    output: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
) -> None:
    """Run SQL over a store's shards with DuckDB.

    The query reads getvariable('store')."""
    from specmoe.cli.params import parse_params
    from specmoe.errors import InputError
    from specmoe.traces.query import query_text, run_query

    if output not in ("table", "csv", "json"):
        raise InputError(f"--format must be table, csv or json, got {output!r}")
    columns, rows = run_query(directory, query_text(sql), parse_params(set_))
    if output == "json":
        typer.echo(json.dumps([dict(zip(columns, row)) for row in rows], indent=2, default=str))
    elif output == "csv":
        import csv
        import sys

        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerows([columns, *rows])
    else:
        cells = [[str(value) for value in row] for row in [columns, *rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
        for row in cells:
            typer.echo("  ".join(value.rjust(width) for value, width in zip(row, widths)))


@app.command("merge")
def merge(
    stores: Annotated[list[Path], typer.Argument(help="Stores to merge, in the order their rows should follow.")],
    out: Annotated[Path, typer.Option(help="New store directory. Rerunning the same command resumes.")],
) -> None:
    """Merge stores collected apart.

    Stores of the same model and settings, collected over different texts."""
    from specmoe.traces.merge import merge_stores

    merged = merge_stores(stores, out)
    typer.echo(
        f"merged {len(stores)} stores: {merged.manifest.num_tokens} tokens in {len(merged.manifest.shards)} "
        f"shards to {out}"
    )
