"""``specmoe bench ...``: benchmarks that write JSON."""

from __future__ import annotations

import json
import shlex
import sys
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


@app.command("predictors")
def bench_predictors(
    traces: Annotated[Path, typer.Option(help="Trace store directory.")],
    json_out: Annotated[Path, typer.Option("--json", help="JSON output; a Markdown table goes beside it (.md).")],
    predictor: Annotated[list[str] | None, typer.Option(help="name[:preset], repeatable (default: all).")] = None,
    budget: Annotated[str, typer.Option(help="cpu (capped epochs/steps) or full.")] = "cpu",
    split_seed: Annotated[int, typer.Option()] = 0,
    bootstrap: Annotated[int, typer.Option()] = 1000,
    save_dir: Annotated[Path | None, typer.Option(help="Also save every fitted predictor here.")] = None,
) -> None:
    """Train and score every predictor on the same document split; JSON + Markdown table."""
    from specmoe.bench.predictors import DEFAULT_PREDICTORS, benchmark_predictors, markdown_table, write_report
    from specmoe.errors import InputError

    if budget not in ("cpu", "full"):
        raise InputError(f"--budget must be cpu or full, got {budget!r}")
    report = benchmark_predictors(traces, specs=tuple(predictor or DEFAULT_PREDICTORS), split_seed=split_seed,
                                  budget=budget, bootstrap=bootstrap, out_dir=save_dir)
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(report, json_out)
    typer.echo(markdown_table(report))
