"""``specmoe evaluate``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from specmoe.storage import atomic


def evaluate_command(
    predictor_dir: Annotated[Path, typer.Option(help="A predictor saved by `specmoe train`.")],
    traces: Annotated[Path, typer.Option(help="Trace store directory.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    split_seed: Annotated[int, typer.Option(help="Seed of the document split.")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples over documents (0: none).")] = 1000,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write rows + cost as JSON here.")] = None,
) -> None:
    """Score a predictor on held-out traces.

    top1_acc, hit1, recall@k, recall@2k per horizon and layer, with 95% bootstrap intervals,
    chance levels and CPU cost."""
    from specmoe.evaluation.evaluate import evaluate_directory

    result = evaluate_directory(predictor_dir, traces, split=split, seed=split_seed, bootstrap=bootstrap)
    result["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(json_out, json.dumps(result, indent=2))
    typer.echo(f"{result['predictor']} on {traces} [{split}, seed {split_seed}]")
    typer.echo(f"{'h':>2} {'layer':>5} {'top1_acc':>18} {'hit1':>7} {'recall@k':>18} {'recall@2k':>9} {'tokens':>8}")
    for row in result["rows"]:
        ci = row.get("recall_at_k_ci")
        ci_text = f" [{ci[0]:.3f},{ci[1]:.3f}]" if ci else ""
        tci = row.get("top1_acc_ci")
        tci_text = f" [{tci[0]:.3f},{tci[1]:.3f}]" if tci else ""
        typer.echo(
            f"{row['horizon']:>2} {row['layer']:>5} {row['top1_acc']:>6.3f}{tci_text:<12} {row['hit1']:>7.3f}"
            f" {row['recall_at_k']:>6.3f}{ci_text:<12} {row['recall_at_2k']:>9.3f} {row['n_tokens']:>8}"
        )
    first = result["rows"][0]
    typer.echo(
        f"chance: top1 {first['chance_top1_acc']:.4f}  recall@k {first['chance_recall_at_k']:.4f}  "
        f"recall@2k {first['chance_recall_at_2k']:.4f}"
    )
    typer.echo(f"cost: {json.dumps(result['cost'])}")
