"""The stack: a log-linear combination fitted on validation data, never below its best member."""

import torch

from specmoe.predictors.base import load_predictor
from specmoe.predictors.metrics import evaluate_predictor
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


def test_a_confident_member_keeps_its_order_far_below_one_in_a_billion(synthetic_splits):
    """A member trained for ranking puts experts 90 nats apart; the stack must still see the
    order of experts whose probability is far below 1e-9."""
    train, _, test = synthetic_splits
    member = make_predictor("transition").fit(train)
    stack = make_predictor("stack", members=("transition",))
    stack.members_, stack.num_layers_, stack.num_experts_ = [member], train.num_layers, train.num_experts
    stack.weights_ = torch.ones(train.num_layers - 1, 3, 1)
    ranks = torch.randperm(train.num_experts, generator=torch.Generator().manual_seed(0)).float()
    peaked = torch.softmax(ranks * 5, -1)  # e^-5 apart: down to 1e-33, in no order of the ids
    member.predict_proba = lambda context: peaked.expand(len(context), 3, -1)
    context = next(test.iter_batches(8)).context(1)
    order = stack.predict_proba(context).argsort(-1, descending=True)
    assert torch.equal(order, peaked.argsort(descending=True).expand_as(order))
