"""Hidden-state lookahead on a real (tiny, random) model's traces."""

import pytest
import torch

from specmoe.predictors.data import TraceDataset
from specmoe.predictors.metrics import evaluate_predictor
from specmoe.predictors.registry import make_predictor


def test_router_applied_to_its_own_input_reproduces_the_recorded_choice(hidden_store):
    """Horizon 0 as a consistency check of the copied norm and router: layer l's router on
    layer l's router input must select exactly what the model selected."""
    data = TraceDataset(hidden_store, "all", hidden="router_input")
    predictor = make_predictor("lookahead", hidden="router_input").fit(data)
    batch = next(data.iter_batches(512))
    for layer in range(data.num_layers):
        logits = predictor.router_logits(batch.hidden[:, layer], layer, layer)
        chosen = logits.topk(data.top_k, dim=-1).indices.sort(-1).values
        assert torch.equal(chosen, batch.expert_ids[:, layer].sort(-1).values)


@pytest.mark.parametrize("hidden", ["residual_out", "router_input"])
def test_lookahead_beats_chance_and_learned_lookahead_trains(hidden_store, hidden):
    data = TraceDataset(hidden_store, "all", hidden=hidden)
    predictor = make_predictor("lookahead", hidden=hidden).fit(data)
    row = next(r for r in evaluate_predictor(predictor, data, bootstrap=0) if r["horizon"] == 1 and r["layer"] == "all")
    assert row["recall_at_k"] > 2 * row["chance_recall_at_k"]
    learned = make_predictor(
        "lookahead-mlp", hidden=hidden, width=32, epochs=1, max_steps_per_epoch=5, batch_size=128
    ).fit(data, progress=False)
    probs = learned.predict_proba(next(data.iter_batches(16)).context(0))
    assert probs.shape == (16, 3, data.num_experts) and torch.isfinite(probs).all()
