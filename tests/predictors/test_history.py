"""Activation-history matching: a sequence's earlier experts pick recorded sequences like it,
whose later layers it predicts; it reads nothing of the current token past its layer."""

import numpy as np
import torch

from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import Context, TraceDataset
from specmoe.predictors.registry import make_predictor
from tests.predictors.synthetic import make_synthetic_store


def _sequence_store(directory):
    """The synthetic store: a window's experts follow its tokens, so windows differ."""
    return make_synthetic_store(directory, num_layers=3, num_experts=8, top_k=1)


def test_the_history_of_a_sequence_selects_the_recorded_sequences_like_it(tmp_path):
    store = _sequence_store(tmp_path / "s")
    history = make_predictor("history", horizons=2, window=8, library_size=16, neighbours=4)
    history.fit(TraceDataset(store, "train"))
    assert history.library_.shape[1:] == (3, 8) and np.allclose(history.library_.sum(-1), 1.0)
    data = TraceDataset(store, "test", previous_tokens=history.previous_tokens)
    batch = next(data.iter_batches(64))
    context = batch.context(0)
    probs = history.predict_proba(context)
    assert probs.shape == (64, 2, 8)
    assert torch.all(history.predict_proba(batch.context(1))[:, 1] == 0)  # horizon 2 from layer 1: no layer 3
    # the prediction for layer 1 is closer to the sequence's own layer-1 usage than to the average
    own = np.zeros((64, 8))
    prev = batch.prev_expert_ids[:, :, 1, 0].numpy()
    for row, ids in enumerate(prev):
        for e in ids[ids >= 0]:
            own[row, e] += 1
    has_history = own.sum(1) > 2
    own = own[has_history] / own[has_history].sum(1, keepdims=True)
    predicted = probs[has_history, 0].numpy()
    average = history.library_[:, 1].mean(0)
    assert np.abs(predicted - own).sum(1).mean() < np.abs(average - own).sum(1).mean()
    # saved and loaded, it predicts the same; the routing of later layers is never read
    history.save(tmp_path / "h")
    loaded = load_predictor(tmp_path / "h")
    torch.testing.assert_close(loaded.predict_proba(context), probs)
    scrambled = Context(
        0,
        context.expert_ids,
        context.gate_weights,
        context.token_ids,
        context.prev_expert_ids,
        None,
        context.num_layers,
        context.num_experts,
    )
    torch.testing.assert_close(history.predict_proba(scrambled), probs)
