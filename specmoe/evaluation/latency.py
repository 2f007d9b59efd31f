"""Predictor cost on CPU, and the model's own time per token to compare it with."""

from __future__ import annotations

import statistics
import time

import torch

from specmoe.predictors.data import TraceDataset


def predictor_latency_us(predictor, data: TraceDataset, *, batch_size: int = 1, repeats: int = 200) -> float:
    """Median microseconds per token per layer for ``predict_proba``, timed as decoding calls
    it: for each of ``repeats`` groups of ``batch_size`` new tokens (batch 1 is
    single-sequence decoding), once after every layer that has a next one. New tokens each
    time, so nothing a predictor reuses across the layers of one token is reused across
    tokens. One CPU thread, as in a serving loop. A cross-token predictor is timed at its
    ``predict_next``, after each layer it serves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batch = next(data.iter_batches(max(batch_size, 1) * (repeats + 5)))
        ask = getattr(predictor, "predict_next", predictor.predict_proba)
        layers = predictor.source_layers() if hasattr(predictor, "predict_next") else range(max(data.num_layers - 1, 1))
        contexts = [batch.context(layer) for layer in layers]
        groups = [slice(i, i + batch_size) for i in range(0, len(batch) - batch_size + 1, batch_size)]
        with torch.no_grad():
            for group in groups[:5]:
                for context in contexts:
                    ask(context.select(group))
            times = []
            for group in groups[5:] or groups:
                calls = [context.select(group) for context in contexts]
                start = time.perf_counter()
                for context in calls:
                    ask(context)
                times.append((time.perf_counter() - start) / len(calls))
        return statistics.median(times) * 1e6 / batch_size
    finally:
        torch.set_num_threads(threads)


def model_time_per_token_us(model_id: str, *, repeats: int = 30) -> float:
    """Median microseconds for one single-token forward pass of the model (batch 1, one
    CPU thread): the per-token cost of greedy decoding without a cache."""
    from specmoe.errors import InputError
    from specmoe.memory import available_bytes
    from specmoe.models.checkpoint import SafetensorsCheckpoint
    from specmoe.models.loading import load_model, local_checkpoint

    weights = sum(e.nbytes for e in SafetensorsCheckpoint(local_checkpoint(model_id)).entries.values())
    free = available_bytes()
    if free is not None and 2 * weights > free:  # loaded whole in float32: twice a bf16 checkpoint
        raise InputError(f"{model_id} does not fit in memory here; its per-token time is not measured")
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
