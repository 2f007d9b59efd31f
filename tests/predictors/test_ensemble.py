"""The ensemble weights members by validation score and reloads to the same predictions."""

import torch

from specmoe.predictors.base import load_predictor
from specmoe.predictors.registry import make_predictor


def test_ensemble_prefers_the_better_member_and_round_trips(synthetic_splits, tmp_path):
    train, val, test = synthetic_splits
    ensemble = make_predictor("ensemble", members=("popularity", "ngram"), temperature=0.05).fit(train, val)
    assert ensemble.member_scores_[1] > ensemble.member_scores_[0]
    assert ensemble.weights_[0, 1] > 0.9
    ensemble.save(tmp_path / "e")
    context = next(test.iter_batches(64)).context(1)
    torch.testing.assert_close(load_predictor(tmp_path / "e").predict_proba(context), ensemble.predict_proba(context))
