"""Predictor cost on CPU, and the model's own time per token to compare it with."""

from __future__ import annotations

import statistics
import time

import torch

from specmoe.predictors.data import TraceDataset


def predictor_latency_us(predictor, data: TraceDataset, *, batch_size: int = 1, repeats: int = 200) -> float:
    """Median microseconds per token per layer for ``predict_proba`` on ``batch_size``
    tokens (batch 1 is single-sequence decoding), one CPU thread as in a serving loop."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = next(data.iter_batches(max(batch_size, 1)))
        layer = max(0, min(data.num_layers - 2, data.num_layers // 2))
        context = batch.context(layer)
        with torch.no_grad():
            for _ in range(5):
                predictor.predict_proba(context)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                predictor.predict_proba(context)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6 / len(context)
    finally:
        torch.set_num_threads(threads)


def model_time_per_token_us(model_id: str, *, repeats: int = 30) -> float:
    """Median microseconds for one single-token forward pass of the model (batch 1, one
    CPU thread): the per-token cost of greedy decoding without a cache."""
    from specmoe.models.loading import load_model

    loaded = load_model(model_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = torch.tensor([[max(3, loaded.tokenizer.eos_token_id or 3)]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            for _ in range(3):
                loaded.adapter.forward(loaded.model, ids, mask)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                loaded.adapter.forward(loaded.model, ids, mask)
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    finally:
        torch.set_num_threads(threads)
