"""``specmoe evaluate``: score a saved predictor on one split of a trace store."""

from __future__ import annotations

from pathlib import Path

from specmoe.errors import SpecmoeError
from specmoe.evaluation.latency import model_time_per_token_us, predictor_latency_us
from specmoe.predictors.base import ExpertPredictor, load_predictor
from specmoe.predictors.data import TraceDataset
from specmoe.predictors.metrics import CalibrationAccumulator, evaluate_next_token, evaluate_predictor
from specmoe.traces.store import TraceStore


def dataset_for(
    predictor: ExpertPredictor, store: TraceStore, split: str, seed: int, splits: dict[str, str] | None = None
) -> TraceDataset:
    """The split of ``store`` with the inputs ``predictor`` reads (hidden states, earlier tokens)."""
    return TraceDataset(
        store, split, seed=seed, previous_tokens=predictor.previous_tokens, hidden=predictor.needs_hidden, splits=splits
    )


def evaluate(
    predictor: ExpertPredictor,
    data: TraceDataset,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    model_time_us: float | None = None,
) -> dict:
    """Metrics rows plus cost. Every row names the trace set, split and seed."""
    calibration = CalibrationAccumulator()
    if hasattr(predictor, "predict_next"):  # cross-token: the next token's layers, from each source layer
        rows = evaluate_next_token(predictor, data, bootstrap=bootstrap, seed=seed)
        calls_per_token = 1  # asked once per token, after the layer it is deployed at
    else:
        rows = evaluate_predictor(predictor, data, bootstrap=bootstrap, seed=seed, calibration=calibration)
        calls_per_token = data.num_layers - 1  # one prediction after every MoE layer but the last
    latency = predictor_latency_us(predictor, data)
    if model_time_us is None:
        try:
            model_time_us = model_time_per_token_us(data.store.manifest.model.id)
        except SpecmoeError:  # the traces' model is not loadable here: report the predictor alone
            model_time_us = None
    cost = {
        "params": predictor.num_parameters(),
        "latency_us_per_token_layer": round(latency, 2),
        "model_time_us_per_token": None if model_time_us is None else round(model_time_us, 1),
        "fraction_of_model_time": None
        if model_time_us is None
        else round(latency * calls_per_token / model_time_us, 5),
    }
    for row in rows:
        row.update(traces=str(data.store.directory), split=data.split, seed=data.seed, stack=data.stack)
    return {
        "rows": rows,
        "calibration": calibration.rows(),
        "cost": cost,
        "predictor": predictor.name,
        "params": predictor.get_params(),
    }


def evaluate_directory(
    predictor_dir: str | Path, traces: str | Path, *, split: str = "test", seed: int = 0, bootstrap: int = 1000
) -> dict:
    predictor = load_predictor(predictor_dir)
    data = dataset_for(predictor, TraceStore.open(traces), split, seed)
    predictor.check_fits(data.num_layers, data.num_experts, f"the traces in {data.store.directory}")
    return evaluate(predictor, data, bootstrap=bootstrap, seed=seed)
