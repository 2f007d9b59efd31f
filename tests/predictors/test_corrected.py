"""The corrected lookahead: it starts exactly at the router lookahead and training moves it."""

import pytest
import torch

from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import TraceDataset
from specmoe.predictors.lookahead import extract_routers
from specmoe.predictors.metrics import evaluate_predictor
from specmoe.predictors.neural.base import ranking_loss
from specmoe.predictors.registry import make_predictor

FAST = {"epochs": 3, "batch_size": 128, "max_steps_per_epoch": 40, "rank": 8}


def _recall(predictor, data):
    return next(r for r in evaluate_predictor(predictor, data, bootstrap=0) if r["layer"] == "all")["recall_at_k"]


def test_ranking_loss_is_zero_only_when_every_true_expert_outranks_every_other():
    targets = torch.tensor([[[0, 1]]])
    right = torch.tensor([[[9.0, 8.0, 0.0, 0.0]]])
    wrong = torch.tensor([[[9.0, 0.0, 8.0, 0.0]]])
    assert ranking_loss(right * 10, targets) < 1e-6 < ranking_loss(wrong * 10, targets)
    swapped = torch.tensor([[[8.0, 9.0, 0.0, 0.0]]])  # the order inside the true set is free
    torch.testing.assert_close(ranking_loss(right, targets), ranking_loss(swapped, targets))
    assert ranking_loss(right, torch.full((1, 1, 2), -2)) == 0  # no target, no loss


def test_an_untrained_correction_is_the_lookahead(hidden_store):
    data = TraceDataset(hidden_store, "all", hidden="residual_out")
    predictor = make_predictor("lookahead-corrected", **FAST)
    predictor.routers_ = extract_routers(hidden_store.manifest.model.id, data.stack)
    predictor.hidden_size_ = data.store.manifest.model.hidden_size
    predictor.init_module(data.num_layers, data.num_experts, data.top_k)
    lookahead = make_predictor("lookahead").fit(data)
    context = next(data.iter_batches(64)).context(0)
    logits, _ = predictor.module_(context)
    torch.testing.assert_close(logits[:, 0], lookahead.router_logits(context.hidden[:, -1], 0, 1))


def test_training_beats_the_lookahead_it_starts_from_and_reloads(hidden_store, tmp_path):
    train = TraceDataset(hidden_store, "train", hidden="residual_out")
    val = train.with_split("val")
    lookahead = make_predictor("lookahead").fit(train)
    predictor = make_predictor("lookahead-corrected", **FAST).fit(train, val, progress=False)
    assert _recall(predictor, train) > _recall(lookahead, train) + 0.02
    predictor.save(tmp_path / "p")
    loaded = load_predictor(tmp_path / "p")
    context = next(val.iter_batches(32)).context(0)
    torch.testing.assert_close(loaded.predict_proba(context), predictor.predict_proba(context))
    assert loaded.num_parameters() == predictor.num_parameters() > 0  # the copied router is not counted


def test_a_bad_objective_is_refused(hidden_store):
    from specmoe.errors import InputError

    data = TraceDataset(hidden_store, "train", hidden="residual_out")
    with pytest.raises(InputError, match="objective must be ranking or softmax"):
        make_predictor("lookahead-corrected", objective="hinge").fit(data)
