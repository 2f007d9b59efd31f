"""Cross-token prediction: the next token's first layers from the current token's last ones."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.lens import LogitLens
from specmoe.models.loading import load_model
from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import TraceDataset
from specmoe.predictors.metrics import evaluate_next_token
from specmoe.predictors.registry import make_predictor
from specmoe.traces.collector import CollectConfig, collect

SHAPE = {"depth": 2, "reach": 2}
FAST = {"epochs": 3, "batch_size": 128, "max_steps_per_epoch": 40, "rank": 8}


@pytest.fixture(scope="module")
def greedy_store(tiny_checkpoints, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("c") / "c.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"id": f"d{i}", "text": f"Story {i}. " + "the fox ran far " * (12 + i)}) for i in range(30)
        )
    )
    config = CollectConfig(
        model=str(tiny_checkpoints["olmoe"]),
        texts=[str(corpus)],
        out=tmp_path_factory.mktemp("g") / "traces",
        seq_len=24,
        generate=12,
        batch_size=8,
        save_residuals=True,
        progress=False,
    )
    return collect(config)


def test_the_saved_lens_guesses_as_the_model_does(tiny_checkpoints, greedy_store):
    model = load_model(str(tiny_checkpoints["olmoe"])).model
    lens = LogitLens.of(model)
    residual = greedy_store.hidden_states(0, "residual_out")[:64, -1].float()
    ids, probs = lens.guess(residual, candidates=3)
    saved_ids, saved_probs = LogitLens.from_tensors(lens.tensors()).guess(residual, candidates=3)
    assert np.array_equal(ids, saved_ids)
    np.testing.assert_allclose(probs, saved_probs, atol=1e-5)


def test_from_the_last_layer_of_greedy_decoding_the_guess_is_the_next_token(greedy_store):
    data = TraceDataset(greedy_store, "all", hidden="residual_out")
    table = make_predictor("next-token-table", **SHAPE).fit(data)
    rows = evaluate_next_token(table, data, bootstrap=0)
    last = [r for r in rows if r["source_layer"] == data.num_layers - 1]
    assert {(r["horizon"], r["layer"]) for r in last if r["layer"] != "all"} == {(1, 0), (2, 1)}
    assert last[0]["guess_accuracy"] == 1.0  # the lens after the last layer is the model's own argmax
    windows = len({w for b in data.iter_batches() for w in b.windows})
    assert last[0]["n_tokens"] == data.store.manifest.collection.generated_tokens * windows  # decoded tokens only


def test_the_table_on_the_guess_is_the_prefetch_plan_and_the_correction_starts_there(greedy_store):
    train = TraceDataset(greedy_store, "train", hidden="residual_out")
    table = make_predictor("next-token-table", **SHAPE, candidates=2).fit(train)
    context = next(train.iter_batches(64)).context(train.num_layers - 1)
    ids, probs = table.guess(context)
    expected = table.table_.expected_rows(ids, probs, 2)
    torch.testing.assert_close(table.predict_next(context), torch.from_numpy(expected))
    learned = make_predictor("next-token-corrected", **SHAPE, candidates=2, **FAST)
    learned.guide_, learned.hidden_size_ = table, train.store.manifest.model.hidden_size
    learned.init_module(train.num_layers, train.num_experts, train.top_k)
    untrained = learned.module_(context, table.predict_next(context))
    torch.testing.assert_close(torch.softmax(untrained, -1), torch.from_numpy(expected).float(), atol=1e-5, rtol=0)


def test_the_learned_predictor_trains_reloads_and_sees_nothing_of_the_next_token(greedy_store, tmp_path):
    train = TraceDataset(greedy_store, "train", hidden="residual_out")
    learned = make_predictor("next-token-corrected", **SHAPE, **FAST).fit(
        train, train.with_split("val"), progress=False
    )
    table = learned.guide_

    def recall(predictor):
        return np.mean(
            [r["recall_at_k"] for r in evaluate_next_token(predictor, train, bootstrap=0) if r["layer"] == 0]
        )

    assert recall(learned) > recall(table)
    learned.save(tmp_path / "p")
    loaded = load_predictor(tmp_path / "p")
    batch = next(train.iter_batches(64))
    context = batch.context(train.num_layers - 1)
    torch.testing.assert_close(loaded.predict_next(context), learned.predict_next(context))
    scrambled = replace(batch, next_expert_ids=torch.randint_like(batch.next_expert_ids, 8), next_token_ids=None)
    after = scrambled.context(train.num_layers - 1)
    torch.testing.assert_close(learned.predict_next(after), learned.predict_next(context))
    with pytest.raises(InputError, match="ask predict_next"):
        learned.predict_proba(context)
