"""``specmoe bench predictor-cost``: what a predictor costs, measured on CPU and counted for
the real models.

Measured: ``predict_proba`` (``predict_next`` for cross-token predictors) at batch 1 and 16,
one thread, on the traces the predictors were fitted on, in rounds that visit every
predictor in turn so that a drift of the machine hits all of them alike. Counted: FLOPs per
prediction at each real model's shape, beside one MoE layer of that model and its whole
per-token compute (:mod:`specmoe.models.shapes`).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from specmoe.evaluation.evaluate import dataset_for
from specmoe.evaluation.latency import predictor_latency_us
from specmoe.models.shapes import PUBLISHED_CONFIGS, model_compute
from specmoe.predictors.base import load_predictor
from specmoe.predictors.sizes import flops_per_call
from specmoe.traces.store import TraceStore


def calls_per_token(predictor, num_layers: int) -> int:
    """Predictions a decoded token asks for: after every layer that has a next one, or once
    (cross-token predictors, at the layer they are deployed after)."""
    return 1 if hasattr(predictor, "predict_next") else num_layers - 1


def benchmark_predictor_cost(
    traces: str | Path,
    predictor_dirs: list[Path],
    *,
    models: tuple[str, ...] = tuple(PUBLISHED_CONFIGS),
    batch_sizes: tuple[int, ...] = (1, 16),
    rounds: int = 3,
    split_seed: int = 0,
) -> dict:
    store = TraceStore.open(traces)
    predictors = {str(d): load_predictor(d) for d in predictor_dirs}
    data = {key: dataset_for(p, store, "test", split_seed) for key, p in predictors.items()}
    timings: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for batch_size in batch_sizes:
            for key, predictor in predictors.items():
                latency = predictor_latency_us(predictor, data[key], batch_size=batch_size, repeats=100)
                timings.setdefault((key, batch_size), []).append(latency)
    computes = [model_compute(m) for m in (store.manifest.model.id, *models)]
    rows = []
    for key, predictor in predictors.items():
        params = predictor.get_params()
        horizons = getattr(predictor, "horizons", 3)
        row = {"predictor": predictor.name, "dir": key, "params": params, "measured_us_per_token_call": {}}
        for batch_size in batch_sizes:
            runs = timings[(key, batch_size)]
            row["measured_us_per_token_call"][batch_size] = {
                "median": round(statistics.median(runs), 2),
                "spread": [round(min(runs), 2), round(max(runs), 2)],
            }
        row["models"] = []
        for compute in computes:
            flops = flops_per_call(
                predictor.name,
                params,
                hidden_size=compute.hidden_size,
                num_experts=compute.num_experts,
                top_k=compute.top_k,
                vocab_size=compute.vocab_size,
                horizons=horizons,
            )
            calls = calls_per_token(predictor, compute.moe_layers)
            row["models"].append(
                {
                    "model": compute.model_id,
                    "flops_per_call": flops,
                    "moe_layer_flops": compute.moe_layer_flops,
                    "of_moe_layer": flops / compute.moe_layer_flops,
                    "calls_per_token": calls,
                    "token_flops": compute.token_flops,
                    "of_token_compute": calls * flops / compute.token_flops,
                }
            )
        rows.append(row)
    return {
        "benchmark": "predictor-cost",
        "traces": str(store.directory),
        "model": store.manifest.model.id,
        "batch_sizes": list(batch_sizes),
        "rounds": rounds,
        "rows": rows,
    }


def markdown_table(report: dict) -> str:
    models = [m["model"] for m in report["rows"][0]["models"]] if report["rows"] else []
    sizes = report["batch_sizes"]
    head = ["predictor", *(f"µs/token/call, batch {b}" for b in sizes), *(f"{m}: % of token" for m in models)]
    lines = [
        (
            f"Measured on the test split of `{report['traces']}` (one thread, median of {report['rounds']} rounds "
            "[slowest, fastest]); counted: FLOPs of the predictions a token needs, as % of the model's per-token "
            "FLOPs (and, in brackets, one prediction as % of one MoE layer)."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for row in report["rows"]:
        cells = [row["predictor"]]
        for b in sizes:
            m = row["measured_us_per_token_call"][b]
            cells.append(f"{m['median']:.1f} [{m['spread'][0]:.1f}, {m['spread'][1]:.1f}]")
        for m in row["models"]:
            cells.append(f"{100 * m['of_token_compute']:.3f} ({100 * m['of_moe_layer']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
