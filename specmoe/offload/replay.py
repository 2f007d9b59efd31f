"""Turn a split of a trace store (and a predictor) into decode-order arrays for the simulator."""

from __future__ import annotations

import numpy as np
import torch

from specmoe.offload.simulator import NO_TOKEN
from specmoe.predictors.data import TraceDataset


def decode_order(
    data: TraceDataset, predictor=None, *, batch_size: int = 1, budget: int = 1, max_windows: int | None = None
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """Routing (S, B, L, k) of ``batch_size`` windows decoded in lockstep, batches one after
    another along S; with a predictor, its top-``budget`` experts and probabilities for every
    (step, sequence, layer, horizon): two (S, B, L, H, budget) arrays."""
    ids, windows, positions, preds, probs = [], [], [], [], []
    for batch in data.iter_batches(8192):
        ids.append(batch.expert_ids.numpy())
        windows.append(batch.windows)
        positions.append(batch.positions)
        if predictor is not None:
            per_layer = [predictor.predict_proba(batch.context(layer)).float() for layer in range(data.num_layers)]
            top = [p.topk(min(budget, p.shape[-1]), dim=-1) for p in per_layer]  # (N, H, m) each
            preds.append(torch.stack([t.indices for t in top], 1).numpy())  # (N, L, H, m)
            probs.append(torch.stack([t.values for t in top], 1).numpy())
    ids, windows, positions = np.concatenate(ids), np.concatenate(windows), np.concatenate(positions)
    order = np.unique(windows)
    if max_windows is not None:
        order = order[:max_windows]
    steps_total, chunks = 0, []
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        rows = [np.nonzero(windows == w)[0] for w in group]
        rows = [r[np.argsort(positions[r])] for r in rows]
        chunks.append((rows, max(len(r) for r in rows)))
        steps_total += chunks[-1][1]
    layers, k = ids.shape[1:]
    routing = np.full((steps_total, batch_size, layers, k), NO_TOKEN, dtype=np.int64)
    pred_ids = pred_probs = None
    if predictor is not None:
        pred_all, prob_all = np.concatenate(preds), np.concatenate(probs)
        pred_ids = np.zeros((steps_total, batch_size) + pred_all.shape[1:], dtype=np.int64)
        pred_probs = np.zeros((steps_total, batch_size) + prob_all.shape[1:], dtype=np.float32)
    step = 0
    for rows, length in chunks:
        for b, r in enumerate(rows):
            routing[step : step + len(r), b] = ids[r]
            if predictor is not None:
                pred_ids[step : step + len(r), b] = pred_all[r]
                pred_probs[step : step + len(r), b] = prob_all[r]
        step += length
    return routing, (None if predictor is None else (pred_ids, pred_probs))
