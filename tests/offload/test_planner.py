"""The prefetch planner: memoised answers are exactly the predictor's own, asked afresh."""

import pytest
import torch

from specmoe.offload.planner import PrefetchPlanner, prefetch_keys
from specmoe.predictors.data import Context, TraceDataset
from specmoe.predictors.registry import make_predictor
from tests.predictors.synthetic import make_synthetic_store

KEYED = ("popularity", "transition", "ngram", "token")


@pytest.fixture(scope="module", params=[1, 2], ids=["top1", "top2"])
def splits(request, tmp_path_factory):
    store = make_synthetic_store(tmp_path_factory.mktemp("planner") / "traces", top_k=request.param, noise=0.2)
    train = TraceDataset(store, "train", seed=0)
    return train, train.with_split("test")


def _decoding_steps(data: TraceDataset, tokens: int = 60):
    """One token at a time, every layer, as a decoding loop holds them: the planner's
    arguments and the context a predictor would be given."""
    batch = next(data.iter_batches(tokens))
    for t in range(len(batch)):
        for layer in range(data.num_layers):
            arrays = (
                batch.expert_ids[t : t + 1, : layer + 1].numpy(),
                batch.gate_weights[t : t + 1, : layer + 1].float().numpy(),
                batch.token_ids[t : t + 1].numpy(),
            )
            context = Context.from_routing(
                layer, *(torch.from_numpy(a) for a in arrays), data.num_layers, data.num_experts
            )
            yield layer, arrays, context


def _repeats(name: str, train: TraceDataset) -> bool:
    """Past top-1 a transition mix reads continuous gate weights, which do not repeat."""
    return train.top_k == 1 or name in ("popularity", "token")


@pytest.mark.parametrize("name", KEYED)
def test_contexts_with_equal_decode_keys_get_equal_predictions(splits, name):
    train, test = splits
    predictor = make_predictor(name).fit(train)
    seen: dict = {}
    contexts = 0
    for layer, arrays, context in _decoding_steps(test):
        contexts += 1
        key = (layer, predictor.decode_key(layer, *arrays))
        probs = predictor.predict_proba(context)
        if key in seen:
            torch.testing.assert_close(probs, seen[key], rtol=0, atol=0)
        seen.setdefault(key, probs)
    if _repeats(name, train):
        assert len(seen) < contexts  # keys repeat, or the memo would never help


@pytest.mark.parametrize("name", KEYED)
def test_the_planner_answers_as_the_predictor_does_and_reuses_answers(splits, name):
    train, test = splits
    predictor = make_predictor(name).fit(train)
    planner = PrefetchPlanner(predictor, train.num_layers, train.num_experts, lookahead=2, budget=2, threshold=0.05)
    for layer, arrays, context in _decoding_steps(test):
        targets = range(layer + 1, min(layer + 3, train.num_layers))
        expected = prefetch_keys(predictor.predict_proba(context), targets, 2, 0.05) if targets else []
        assert planner.plan(layer, *arrays, offset=10) == [(target + 10, e) for target, e in expected]
    assert planner.misses > 0 and (planner.hits > 0) == _repeats(name, train)
    assert planner.stats()["plan_memo_hit_rate"] == planner.hits / (planner.hits + planner.misses)


def test_a_predictor_without_a_decode_key_is_asked_every_time(splits):
    train, test = splits
    predictor = make_predictor("transition").fit(train)
    predictor.decode_key = lambda *routing: None
    planner = PrefetchPlanner(predictor, train.num_layers, train.num_experts)
    asked = 0
    for layer, arrays, _ in _decoding_steps(test, 10):
        planner.plan(layer, *arrays)
        asked += layer < train.num_layers - 1  # the last layer has nothing to plan
    assert planner.hits == 0 and planner.misses == asked


def test_the_memo_never_holds_more_than_max_entries(splits):
    train, test = splits
    planner = PrefetchPlanner(make_predictor("token").fit(train), train.num_layers, train.num_experts, max_entries=5)
    for layer, arrays, _ in _decoding_steps(test):
        planner.plan(layer, *arrays)
        assert len(planner._memo) <= 5


def test_prefetch_keys_takes_the_budget_per_layer_pooled_over_the_batch():
    probs = torch.zeros(2, 3, 6)
    probs[0, 0, [1, 2]] = torch.tensor([0.6, 0.4])
    probs[1, 0, [2, 3]] = torch.tensor([0.5, 0.5])  # pooled: expert 2 (0.9), then 1 (0.6)
    probs[:, 1, 4] = 1.0
    probs[:, 1, 5] = 0.5
    assert prefetch_keys(probs, range(3, 5), budget=2) == [(3, 2), (3, 1), (4, 4), (4, 5)]
    # a threshold drops what no token believes in, whatever the pooled rank
    assert prefetch_keys(probs, range(3, 5), budget=2, threshold=0.55) == [(3, 1), (4, 4)]
    assert prefetch_keys(probs[:1], range(3, 4), budget=1) == [(3, 1)]
    # ties go to the lower expert id, whatever dtype the predictor answers in
    assert prefetch_keys(torch.full((1, 1, 4), 0.25, dtype=torch.bfloat16), range(2, 3), budget=2) == [(2, 0), (2, 1)]
