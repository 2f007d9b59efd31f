"""The stack: a log-linear combination fitted on validation data, never below its best member."""

import torch

from specmoe.evaluation.metrics import evaluate_predictor
from specmoe.predictors.base import load_predictor
from specmoe.predictors.registry import make_predictor


def _recalls(predictor, data):
    return [r["recall_at_k"] for r in evaluate_predictor(predictor, data, bootstrap=0) if r["layer"] == "all"]


def test_a_useless_member_cannot_pull_the_stack_below_the_best_one(synthetic_splits, tmp_path):
    train, val, test = synthetic_splits
    stack = make_predictor("stack", members=("popularity", "transition"), steps=50).fit(train, val)
    best = stack.member_scores_.max(0).values
    assert (stack.stack_scores_ >= best).all()
    transition = stack.members_[1]
    for ours, theirs in zip(_recalls(stack, test), _recalls(transition, test)):
        assert ours >= theirs - 0.01
    stack.save(tmp_path / "s")
    context = next(test.iter_batches(64)).context(1)
    torch.testing.assert_close(load_predictor(tmp_path / "s").predict_proba(context), stack.predict_proba(context))
