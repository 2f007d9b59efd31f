"""Next-token prefetch: the logit lens of a real model, the keys it plans, and the replay's
count of guesses."""

import numpy as np
import pytest
import torch

from specmoe.bench.replay import random_experts, replay
from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.offload.live.next_token import LogitLens, NextTokenPlanner
from specmoe.offload.policy import PrefetchSettings
from specmoe.offload.settings import NextTokenSettings
from specmoe.predictors.data import TraceDataset
from specmoe.predictors.registry import make_predictor
from specmoe.settings import validated
from specmoe.traces.recorder import RoutingRecorder
from tests.predictors.synthetic import make_synthetic_store

LAYERS, EXPERTS, TOP_K = 4, 16, 2
TWO_PER_LAYER = PrefetchSettings(experts_per_layer=2)


def _planner(table, layer, depth=1):
    return NextTokenPlanner(_GuessStored(), table, NextTokenSettings(layer=layer, depth=depth), LAYERS, TWO_PER_LAYER)


def test_the_lens_on_the_last_layer_names_the_models_own_argmax(tiny_checkpoints):
    loaded = load_model(str(tiny_checkpoints["olmoe"]))
    ids = torch.tensor([[5, 17, 3, 99, 42, 8, 61, 7]])
    with torch.no_grad(), RoutingRecorder(loaded, residuals=True) as recorder:
        logits = loaded.model(input_ids=ids).logits[0]
        last = recorder.pop()[("decoder", loaded.stacks["decoder"] - 1)].residual_out
    guessed, probs = LogitLens.of(loaded.model).guess(last, candidates=3)
    assert np.array_equal(guessed[:, 0], logits.argmax(-1).numpy())
    assert np.array_equal(guessed, logits.topk(3, -1).indices.numpy())
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert (np.diff(probs, axis=-1) <= 0).all()


def test_the_lens_refuses_an_encoder_decoder_model(tiny_checkpoints):
    with pytest.raises(InputError, match="decoder-only"):
        LogitLens.of(load_model(str(tiny_checkpoints["switch_transformers"])).model)


class _GuessStored:
    """A lens stub whose guess is the id written in the residual's first entry."""

    def guess(self, residual, candidates=1):
        return residual[:, :1].long().numpy(), np.ones((len(residual), 1))


@pytest.fixture(scope="module")
def token_table(tmp_path_factory):
    """Fitted on synthetic routing in which a token id fixes the experts of every layer."""
    store = make_synthetic_store(tmp_path_factory.mktemp("s"), num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K)
    return make_predictor("token").fit(TraceDataset(store, "all"))


def _keys(rows) -> list:
    return [(layer, e) for layer, listed, _ in rows for e, _ in listed]


def _routing_of(tokens: np.ndarray) -> np.ndarray:
    """The synthetic store's rule: layer 0 from the token, each next layer from the last."""
    ids = np.zeros((len(tokens), LAYERS, TOP_K), dtype=np.int64)
    ids[:, 0, 0] = tokens % EXPERTS
    for layer in range(1, LAYERS):
        ids[:, layer, 0] = (3 * ids[:, layer - 1, 0] + layer) % EXPERTS
    ids[:, :, 1] = (ids[:, :, 0] + 5) % EXPERTS
    return ids


def test_the_plan_holds_the_guessed_tokens_experts_for_its_first_layers(token_table):
    planner = _planner(token_table, 2, depth=2)
    ids, probs = planner.guess(torch.tensor([[21.0, 0.0]]))
    assert ids.tolist() == [[21]] and probs.tolist() == [[1.0]]
    keys = _keys(planner.plan(ids, probs))
    expected = _routing_of(np.array([21]))[0]
    assert sorted(keys) == sorted((layer, int(e)) for layer in (0, 1) for e in expected[layer])
    # targets stop at the guess layer: after layer 0 only the next token's layer 0 may be keyed
    early = _planner(token_table, 0)
    assert {layer for layer, _ in _keys(early.plan(*early.guess(torch.tensor([[21.0, 0.0]]))))} == {0}
    with pytest.raises(InputError, match="reaches past the guess layer 0"):
        _planner(token_table, 0, depth=2)


def test_the_planner_refuses_bad_settings_and_a_predictor_without_a_token_table(token_table):
    with pytest.raises(InputError, match=r"--next-token-layer must be in \[0, 4\), got 4"):
        _planner(token_table, 4)
    with pytest.raises(InputError, match="--next-token-depth: Input should be greater than or equal to 1"):
        validated(NextTokenSettings, {"layer": 1, "depth": 0})
    with pytest.raises(InputError, match="needs a token table predictor, got 'popularity'"):
        _planner(make_predictor("popularity"), 1)


@pytest.mark.parametrize(("offset", "planning"), [(0, "inline"), (1, "inline"), (0, "background")])
def test_replay_counts_right_and_wrong_guesses(token_table, tmp_path, offset, planning):
    tokens = np.arange(20) * 7 % 50
    routing = _routing_of(tokens)
    # the residual after the guess layer of token t holds token t+1 (+ offset: a wrong guess)
    residuals = torch.zeros(len(tokens), 8)
    residuals[:-1, 0] = torch.from_numpy(tokens[1:] + offset).float()
    files = random_experts("disk", LAYERS, EXPERTS, 32, 16, directory=tmp_path)
    planner = _planner(token_table, 2)
    result = replay(
        files,
        routing,
        np.full(routing.shape, 0.5, dtype=np.float32),
        tokens,
        policy="prefetch+next-token",
        budget_bytes=12 * files.expert_nbytes(0),
        prefetch=TWO_PER_LAYER,
        predictor=token_table,
        num_experts=EXPERTS,
        warmup=4,
        planning=planning,
        next_token=planner,
        residuals=residuals,
    )
    # every timed token but the last: the guess is made on the decoding thread, whatever the planning
    assert result.stats["next_token_guesses"] == 20 - 4 - 1
    assert result.row(0.2)["next_token_guess_accuracy"] == (1.0 if offset == 0 else 0.0)
    assert result.stats["peak_bytes"] <= 12 * files.expert_nbytes(0)
    with pytest.raises(ValueError, match="residuals of every token"):
        replay(
            files,
            routing,
            routing * 0.0,
            tokens,
            policy="prefetch+next-token",
            budget_bytes=1 << 20,
            predictor=token_table,
            num_experts=EXPERTS,
            next_token=planner,
            residuals=residuals[:3],
        )
