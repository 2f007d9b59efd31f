"""Turn a split of a trace store (and a predictor) into decode-order arrays for the simulator."""

from __future__ import annotations

import numpy as np

from specmoe.offload.simulated.simulator import NO_TOKEN
from specmoe.predictors.data import TraceDataset


def decode_order(
    data: TraceDataset,
    predictor=None,
    *,
    batch_size: int = 1,
    horizons: int = 1,
    max_windows: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Routing (S, B, L, k) of ``batch_size`` windows decoded in lockstep, batches one after
    another along S; with a predictor, its probabilities for the first ``horizons`` horizons
    of every (step, sequence, layer): (S, B, L, H, E), zero where a slot has no token."""
    ids, windows, positions = [], [], []
    for batch in data.iter_batches(8192):
        ids.append(batch.expert_ids.numpy())
        windows.append(batch.windows)
        positions.append(batch.positions)
    ids, windows, positions = np.concatenate(ids), np.concatenate(windows), np.concatenate(positions)
    order = np.unique(windows)
    if max_windows is not None:
        order = order[:max_windows]
    probs = []
    if predictor is not None:  # only for the windows replayed: dense probabilities are large
        for batch in data.iter_batches(8192):
            chosen = np.isin(batch.windows, order)
            if chosen.any():
                per_layer = [
                    predictor.predict_proba(batch.context(layer))[:, :horizons].float().numpy()[chosen]
                    for layer in range(data.num_layers)
                ]
                probs.append(np.stack(per_layer, 1))  # (N, L, H, E)
    steps_total, chunks = 0, []
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        rows = [np.nonzero(windows == w)[0] for w in group]
        rows = [r[np.argsort(positions[r])] for r in rows]
        chunks.append((rows, max(len(r) for r in rows)))
        steps_total += chunks[-1][1]
    layers, k = ids.shape[1:]
    routing = np.full((steps_total, batch_size, layers, k), NO_TOKEN, dtype=np.int64)
    predicted = None
    if predictor is not None:
        compact = np.concatenate(probs)  # the chosen rows, in the order of ids
        slot = np.cumsum(np.isin(windows, order)) - 1  # row of ids -> row of compact
        predicted = np.zeros((steps_total, batch_size) + compact.shape[1:], dtype=np.float32)
    step = 0
    for rows, length in chunks:
        for b, r in enumerate(rows):
            routing[step : step + len(r), b] = ids[r]
            if predictor is not None:
                predicted[step : step + len(r), b] = compact[slot[r]]
        step += length
    return routing, predicted
