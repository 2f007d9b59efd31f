"""``specmoe bench ...``: benchmarks that write JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks (write JSON).", no_args_is_help=True)


@app.command("collect")
def bench_collect(
    model: Annotated[str, typer.Option(help="Model id, path or built-in name.")] = "switch-128e",
    max_tokens: Annotated[int, typer.Option(help="Tokens per measurement.")] = 16384,
    seq_len: Annotated[int, typer.Option()] = 128,
    batch_size: Annotated[int, typer.Option()] = 8,
    repeats: Annotated[int, typer.Option(help="Alternating hooked / plain passes.")] = 3,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Collection throughput, and the overhead of recording hooks versus the plain forward pass."""
    from specmoe.bench.collection import benchmark_collection

    result = benchmark_collection(model, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size,
                                  repeats=repeats)
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    typer.echo(text)
