"""Turn a split of a trace store (and a predictor) into decode-order arrays for the simulator."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from specmoe.offload.simulated.simulator import NO_TOKEN
from specmoe.predictors.data import TraceDataset


class DecodeOrder(NamedTuple):
    routing: np.ndarray
    """(S, B, L, k): ``batch_size`` windows decoded in lockstep, batches one after another."""
    probs: np.ndarray | None
    """(S, B, L, H, E): a predictor's probabilities, zero where a slot has no token."""
    token_ids: np.ndarray
    """(S, B): each slot's token id (NO_TOKEN where it has none)."""
    sequences: np.ndarray
    """(S, B): the window each slot's token is of (NO_TOKEN where it has none)."""


def decode_order(
    data: TraceDataset,
    predictor=None,
    *,
    batch_size: int = 1,
    horizons: int = 1,
    max_windows: int | None = None,
) -> DecodeOrder:
    """Routing, token ids and windows of ``batch_size`` windows decoded in lockstep, batches
    one after another along S; with a predictor, its probabilities for the first
    ``horizons`` horizons of every (step, sequence, layer)."""
    ids, windows, positions, tokens = [], [], [], []
    for batch in data.iter_batches(8192):
        ids.append(batch.expert_ids.numpy())
        windows.append(batch.windows)
        positions.append(batch.positions)
        tokens.append(batch.token_ids.numpy())
    ids, windows, positions, tokens = map(np.concatenate, (ids, windows, positions, tokens))
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
    token_ids = np.full((steps_total, batch_size), NO_TOKEN, dtype=np.int64)
    sequences = np.full((steps_total, batch_size), NO_TOKEN, dtype=np.int64)
    predicted = None
    if predictor is not None:
        compact = np.concatenate(probs)  # the chosen rows, in the order of ids
        slot = np.cumsum(np.isin(windows, order)) - 1  # row of ids -> row of compact
        predicted = np.zeros((steps_total, batch_size) + compact.shape[1:], dtype=np.float32)
    step = 0
    for rows, length in chunks:
        for b, r in enumerate(rows):
            routing[step : step + len(r), b] = ids[r]
            token_ids[step : step + len(r), b] = tokens[r]
            sequences[step : step + len(r), b] = windows[r]
            if predictor is not None:
                predicted[step : step + len(r), b] = compact[slot[r]]
        step += length
    return DecodeOrder(routing, predicted, token_ids, sequences)
