"""Counting predictors learn the planted structure; popularity stays near chance."""

import torch

from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import Context, TraceDataset
from specmoe.predictors.metrics import evaluate_predictor
from specmoe.predictors.registry import make_predictor


def _all_rows(rows, horizon):
    return next(r for r in rows if r["horizon"] == horizon and r["layer"] == "all")


def test_transition_and_ngram_learn_the_chain_popularity_does_not(synthetic_splits):
    train, val, test = synthetic_splits
    scores = {}
    for name in ("popularity", "transition", "ngram", "token", "combo"):
        predictor = make_predictor(name).fit(train, val)
        scores[name] = _all_rows(evaluate_predictor(predictor, test, bootstrap=50), 1)
    assert scores["transition"]["top1_acc"] > 0.9
    assert scores["ngram"]["top1_acc"] > 0.9
    assert scores["combo"]["top1_acc"] > 0.9
    assert scores["popularity"]["top1_acc"] < 0.25
    lo, hi = scores["transition"]["top1_acc_ci"]
    assert lo <= scores["transition"]["top1_acc"] <= hi


def test_save_load_round_trip_gives_identical_predictions(synthetic_splits, tmp_path):
    train, val, test = synthetic_splits
    batch = next(test.iter_batches(256))
    for name in ("popularity", "transition", "ngram", "token", "combo"):
        predictor = make_predictor(name).fit(train, val)
        predictor.save(tmp_path / name)
        loaded = load_predictor(tmp_path / name)
        for layer in range(test.num_layers - 1):
            torch.testing.assert_close(
                loaded.predict_proba(batch.context(layer)), predictor.predict_proba(batch.context(layer))
            )


def test_probabilities_are_distributions(synthetic_splits):
    train, val, test = synthetic_splits
    batch = next(test.iter_batches(128))
    for name in ("popularity", "transition", "ngram", "token", "combo"):
        probs = make_predictor(name).fit(train).predict_proba(batch.context(1))
        assert probs.shape == (len(batch), 3, test.num_experts)
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(batch), 3))


def test_refitting_drops_the_tables_derived_from_the_old_fit(synthetic_splits, tmp_path):
    """The per-layer tables a predictor derives on first use (and the token predictor's
    last-token rows) belong to one fit: refitting on other data predicts as a fresh fit does."""
    from tests.predictors.synthetic import make_synthetic_store

    train, val, test = synthetic_splits
    other = TraceDataset(make_synthetic_store(tmp_path / "other", noise=0.5, seed=3), "all")
    batch = next(test.iter_batches(64))
    for name in ("popularity", "transition", "ngram", "token"):
        predictor = make_predictor(name).fit(train, val)
        for layer in range(test.num_layers - 1):
            predictor.predict_proba(batch.context(layer))
        predictor.fit(other)
        fresh = make_predictor(name).fit(other)
        for layer in range(test.num_layers - 1):
            expected = fresh.predict_proba(batch.context(layer))
            torch.testing.assert_close(predictor.predict_proba(batch.context(layer)), expected)


def test_transition_top1_shortcut_matches_the_gate_weighted_mix(synthetic_splits):
    """Top-1 routing takes a shortcut past the gate-weight mixing; padding each token with a
    dropped second expert forces the general path, which must give the same distribution."""
    train, _, _ = synthetic_splits
    predictor = make_predictor("transition").fit(train)
    ids = torch.tensor([[[3], [0]], [[1], [7]]])
    weights = torch.tensor([[[0.4], [0.9]], [[0.2], [0.6]]])
    padded_ids = torch.cat([ids, torch.full_like(ids, -1)], -1)
    padded_weights = torch.cat([weights, torch.full_like(weights, 0.5)], -1)
    tokens = torch.tensor([5, 6])
    top1 = Context.from_routing(1, ids, weights, tokens, train.num_layers, train.num_experts)
    padded = Context.from_routing(1, padded_ids, padded_weights, tokens, train.num_layers, train.num_experts)
    torch.testing.assert_close(predictor.predict_proba(top1), predictor.predict_proba(padded))
    dropped = Context.from_routing(
        1, torch.full_like(padded_ids, -1), padded_weights, tokens, train.num_layers, train.num_experts
    )
    torch.testing.assert_close(
        predictor.predict_proba(dropped), make_predictor("popularity").fit(train).predict_proba(dropped)
    )
