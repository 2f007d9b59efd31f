"""``specmoe bench predictors``: train and score every predictor on one document split.

Torch predictors run under a budget: ``cpu`` caps epochs and steps so the whole benchmark
fits in minutes on 2 cores (those whose own settings already converge on 2 cores in minutes,
``fits_cpu``, keep them); ``full`` uses each predictor's own settings (for a GPU).
Cross-token predictors are scored on the next token's layers
(:func:`specmoe.predictors.metrics.evaluate_next_token`) and get a table of their own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from specmoe.bench.progress import FinishedRuns
from specmoe.errors import SpecmoeError
from specmoe.evaluation.evaluate import dataset_for, evaluate
from specmoe.evaluation.latency import model_time_per_token_us
from specmoe.predictors.neural.base import TorchPredictor
from specmoe.predictors.registry import make_predictor, parse_label
from specmoe.storage import atomic
from specmoe.traces.splits import assign_splits
from specmoe.traces.store import TraceStore

DEFAULT_PREDICTORS = (
    "popularity",
    "transition",
    "ngram",
    "token",
    "combo",
    "lookahead",
    "interlayer:baseline",
    "multiscale:small",
    "lookahead-mlp",
    "ensemble",
    "lookahead-corrected",
    "stack",
    "next-token-table",
    "next-token-corrected",
)
BUDGETS = {"cpu": {"epochs": 2, "max_steps_per_epoch": 100, "batch_size": 128}, "full": {}}


def _make(spec: str, budget: str, horizons: int):
    name, preset = parse_label(spec)
    probe = make_predictor(name, preset)
    capped = isinstance(probe, TorchPredictor) and not probe.fits_cpu
    overrides = BUDGETS[budget] if capped else {}
    if name == "ensemble" and budget == "cpu":
        overrides = {"member_params": {"interlayer:small": BUDGETS["cpu"]}}
    if not hasattr(probe, "predict_next"):  # cross-token predictors have a depth, not horizons
        overrides = {"horizons": horizons, **overrides}
    return make_predictor(name, preset, **overrides)


def _skip_reason(predictor, store) -> str | None:
    if predictor.needs_hidden and predictor.needs_hidden not in store.manifest.collection.hidden:
        return f"traces have no {predictor.needs_hidden} states"
    if hasattr(predictor, "predict_next") and "encoder" in store.manifest.model.stacks:
        return "cross-token prediction guesses the next token: it needs a decoder-only model"
    return None


def benchmark_predictors(
    traces: str | Path,
    *,
    specs: tuple[str, ...] = DEFAULT_PREDICTORS,
    split_seed: int = 0,
    budget: str = "cpu",
    horizons: int = 3,
    bootstrap: int = 1000,
    out_dir: Path | None = None,
    progress: bool = True,
    progress_file: Path | None = None,
) -> dict:
    """``progress_file``: where each predictor's result is kept as it finishes, so that an
    interrupted call with the same arguments resumes; the caller removes it
    (:func:`specmoe.bench.progress.discard`) once it has saved the report."""
    finished = FinishedRuns(
        progress_file, {k: v for k, v in locals().items() if k not in ("progress", "progress_file")}
    )
    store = TraceStore.open(traces)
    splits = assign_splits(store, split_seed)
    try:
        model_time = model_time_per_token_us(store.manifest.model.id)
    except SpecmoeError:
        model_time = None
    results = []
    for run, spec in enumerate(specs):
        if run in finished.done:
            results.append(finished.done[run])
            continue
        predictor = _make(spec, budget, horizons)
        if reason := _skip_reason(predictor, store):
            results.append({"predictor": spec, "skipped": reason})
            continue
        train = dataset_for(predictor, store, "train", split_seed, splits)
        started = time.perf_counter()
        if isinstance(predictor, TorchPredictor):
            predictor.fit(train, train.with_split("val"), progress=progress)
        else:
            predictor.fit(train, train.with_split("val"))
        fit_seconds = time.perf_counter() - started
        if out_dir:
            predictor.save(Path(out_dir) / "predictors" / spec.replace(":", "-"))
        result = evaluate(
            predictor, train.with_split("test"), bootstrap=bootstrap, seed=split_seed, model_time_us=model_time
        )
        result.update(predictor=spec, fit_seconds=round(fit_seconds, 2))
        if summary := getattr(predictor, "training_summary_", None):
            result["training"] = summary
        if hasattr(predictor, "member_scores_"):  # report each member on test beside the fusion
            result["member_val_recall_at_k"] = dict(zip(predictor.members, predictor.member_scores_.tolist()))
            result["member_weights"] = dict(zip(predictor.members, predictor.weights_.transpose(0, -1).tolist()))
            result["members"] = {
                spec: [
                    r
                    for r in evaluate(
                        member, train.with_split("test"), bootstrap=bootstrap, seed=split_seed, model_time_us=model_time
                    )["rows"]
                    if r["layer"] == "all"
                ]
                for spec, member in zip(predictor.members, predictor.members_)
            }
        results.append(result)
        finished.add(run, result)
    manifest = store.manifest
    return {
        "benchmark": "predictors",
        "traces": str(store.directory),
        "model": manifest.model.id,
        "num_layers": manifest.model.stacks[store.default_stack()].num_layers,
        "num_experts": manifest.model.num_experts,
        "top_k": manifest.model.top_k,
        "split": "test",
        "split_seed": split_seed,
        "budget": budget,
        "budget_overrides": BUDGETS[budget],
        "split_sizes": {s: sum(1 for v in splits.values() if v == s) for s in ("train", "val", "test")},
        "results": results,
    }


def _ci(row: dict, name: str) -> str:
    low, high = row.get(f"{name}_ci", [0, 0])
    return f"{row[name]:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(report: dict) -> str:
    lines = [
        (
            f"Test split of `{report['traces']}` (model `{report['model']}`, L={report['num_layers']}, "
            f"E={report['num_experts']}, k={report['top_k']}; split seed {report['split_seed']}, documents "
            f"train/val/test = {report['split_sizes']['train']}/{report['split_sizes']['val']}/"
            f"{report['split_sizes']['test']}; budget `{report['budget']}`). 95% bootstrap intervals over documents."
        ),
        "",
        (
            "| predictor | params | h | top1_acc | hit1 | exact | recall@k | recall@1.5k | recall@2k | recall@3k "
            "| µs/token/layer | × model time |"
        ),
        "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    chance, crossing = None, []
    for result in report["results"]:
        if "skipped" in result:
            lines.append(f"| {result['predictor']} | | | skipped: {result['skipped']} | | | | | | | | |")
            continue
        if any(r.get("crosses_token") for r in result["rows"]):
            crossing.append(result)
            continue
        cost = result["cost"]
        frac = cost["fraction_of_model_time"]
        for row in (r for r in result["rows"] if r["layer"] == "all"):
            chance = row
            lines.append(
                f"| {result['predictor']} | {cost['params']:,} | {row['horizon']} | {_ci(row, 'top1_acc')} "
                f"| {row['hit1']:.3f} | {row['exact_match']:.3f} | {_ci(row, 'recall_at_k')} "
                f"| {row['recall_at_1.5k']:.3f} | {row['recall_at_2k']:.3f} | {row['recall_at_3k']:.3f} "
                f"| {cost['latency_us_per_token_layer']:.1f} | {'' if frac is None else f'{frac:.4f}'} |"
            )
    if chance:
        lines.append(
            f"| *chance* | | | {chance['chance_top1_acc']:.4f} | {chance['chance_hit1']:.4f} | "
            f"{chance['chance_exact_match']:.2g} | {chance['chance_recall_at_k']:.4f} | "
            f"{chance['chance_recall_at_1.5k']:.4f} | {chance['chance_recall_at_2k']:.4f} | "
            f"{chance['chance_recall_at_3k']:.4f} | | |"
        )
    if crossing:
        lines += [
            "",
            (
                "Across the token boundary: asked after token t's layer `from`, scored on token t+1's layer `to` "
                "(its horizon counts the layers in between); decoded tokens only in decoding traces. `guess` is "
                "how often the logit lens's top guess was the next token."
            ),
            "",
            (
                "| predictor | from | to | h | guess | top1_acc | exact | recall@k | recall@1.5k | recall@2k "
                "| recall@3k | µs/token |"
            ),
            "|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|",
        ]
        for result in crossing:
            for row in (r for r in result["rows"] if r["layer"] != "all"):
                lines.append(
                    f"| {result['predictor']} | {row['source_layer']} | {row['layer']} | {row['horizon']} "
                    f"| {row.get('guess_accuracy', float('nan')):.3f} | {_ci(row, 'top1_acc')} "
                    f"| {row['exact_match']:.3f} | {_ci(row, 'recall_at_k')} | {row['recall_at_1.5k']:.3f} "
                    f"| {row['recall_at_2k']:.3f} | {row['recall_at_3k']:.3f} "
                    f"| {result['cost']['latency_us_per_token_layer']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def write_report(report: dict, json_out: Path, markdown_out: Path | None = None) -> None:
    json_out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(json_out, json.dumps(report, indent=2))
    atomic.write_text(markdown_out or json_out.with_suffix(".md"), markdown_table(report))
