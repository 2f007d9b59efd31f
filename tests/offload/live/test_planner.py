"""The prefetch planner: memoised answers are exactly the predictor's own, asked afresh."""

import pytest
import torch

from specmoe.offload.live.planner import PrefetchPlanner
from specmoe.offload.policy import PrefetchSettings, choose_prefetches
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
    settings = PrefetchSettings(layers_ahead=2, experts_per_layer=2, min_probability=0.05)
    planner = PrefetchPlanner(predictor, train.num_layers, train.num_experts, settings)
    for layer, arrays, context in _decoding_steps(test):
        targets = range(layer + 1, min(layer + 3, train.num_layers))
        expected = choose_prefetches(predictor.predict_proba(context), targets, 2, 0.05) if targets else []
        rows = planner.plan(layer, *arrays, offset=10)
        assert [(target, e) for target, listed, _ in rows for e, _ in listed] == [(t + 10, e) for t, e in expected]
        scores = predictor.predict_proba(context)[0].numpy()  # uncalibrated: the scores are the probabilities
        for target, listed, _ in rows:
            assert [q for _, q in listed] == pytest.approx([scores[target - 11 - layer, e] for e, _ in listed])
    assert planner.misses > 0 and (planner.hits > 0) == _repeats(name, train)
    assert planner.stats()["plan_memo_hit_rate"] == planner.hits / (planner.hits + planner.misses)


def test_a_predictor_without_a_decode_key_is_asked_every_time(splits):
    train, test = splits
    predictor = make_predictor("transition").fit(train)
    predictor.decode_key = lambda *routing: None
    planner = PrefetchPlanner(predictor, train.num_layers, train.num_experts, _resolved(train))
    asked = 0
    for layer, arrays, _ in _decoding_steps(test, 10):
        planner.plan(layer, *arrays)
        asked += layer < train.num_layers - 1  # the last layer has nothing to plan
    assert planner.hits == 0 and planner.misses == asked


def test_the_memo_never_holds_more_than_max_entries(splits):
    train, test = splits
    token = make_predictor("token").fit(train)
    planner = PrefetchPlanner(token, train.num_layers, train.num_experts, _resolved(train), max_entries=5)
    for layer, arrays, _ in _decoding_steps(test):
        planner.plan(layer, *arrays)
        assert len(planner._memo) <= 5


def _resolved(data: TraceDataset) -> PrefetchSettings:
    return PrefetchSettings().resolve(top_k=data.top_k, num_layers=data.num_layers)
