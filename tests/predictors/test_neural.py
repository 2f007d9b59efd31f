"""Torch predictors on the synthetic store: they learn, stay finite, resume, and never leak."""

import json
from dataclasses import replace

import pytest
import torch

from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import TraceDataset
from specmoe.predictors.metrics import evaluate_predictor
from specmoe.predictors.registry import make_predictor
from specmoe.training.loop import NonFiniteLossError

TINY = dict(
    d_model=32,
    heads=2,
    ff=64,
    depth=1,
    memory_slots=8,
    epochs=2,
    max_steps_per_epoch=30,
    batch_size=128,
    lr=3e-3,
    dropout=0.0,
)


def _h1(predictor, data):
    return next(
        r for r in evaluate_predictor(predictor, data, bootstrap=0) if r["horizon"] == 1 and r["layer"] == "all"
    )


@pytest.mark.parametrize("name", ["interlayer", "multiscale"])
def test_seed_transformers_learn_the_chain(synthetic_splits, name):
    train, val, test = synthetic_splits
    predictor = make_predictor(name, **{**TINY, "epochs": 6, "batch_size": 64, "max_steps_per_epoch": 40}).fit(
        train, val, progress=False
    )
    assert _h1(predictor, test)["recall_at_k"] > 0.5  # chance is 2/16


def test_multiscale_loss_is_finite_from_the_first_batch(synthetic_splits):
    train, _, _ = synthetic_splits
    predictor = make_predictor("multiscale", **TINY)
    predictor.init_module(train.num_layers, train.num_experts, train.top_k)
    batch = next(train.iter_batches(64))
    for layer in range(train.num_layers - 1):  # layer 0 has no earlier layers at all: all padding
        loss = predictor.loss(batch, layer)
        assert torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in predictor.module_.parameters() if p.grad is not None)


def test_augmentations_train_and_are_off_at_evaluation(synthetic_splits):
    train, val, test = synthetic_splits
    predictor = make_predictor(
        "interlayer", **TINY, permute_experts=True, layer_dropout=0.2, subsample=0.8, mixup=0.4, embedding_noise=0.1
    ).fit(train, val, progress=False)
    batch = next(test.iter_batches(64))
    first = predictor.predict_proba(batch.context(1))
    torch.testing.assert_close(first, predictor.predict_proba(batch.context(1)))  # deterministic: no noise


def test_every_predictor_ignores_future_layers(synthetic_splits):
    """Scramble the routing of layers > l: predictions made after layer l must not move."""
    train, val, test = synthetic_splits
    predictors = [make_predictor(n).fit(train, val) for n in ("popularity", "transition", "ngram", "token", "combo")]
    predictors += [make_predictor(n, **TINY).fit(train, val, progress=False) for n in ("interlayer", "multiscale")]
    data = TraceDataset(test.store, "test", seed=0, previous_tokens=2, splits=test.splits)
    batch = next(data.iter_batches(64))
    for layer in range(data.num_layers - 1):
        scrambled = replace(batch, expert_ids=batch.expert_ids.clone(), gate_weights=batch.gate_weights.clone())
        scrambled.expert_ids[:, layer + 1 :] = torch.randint(
            0, data.num_experts, scrambled.expert_ids[:, layer + 1 :].shape
        )
        scrambled.gate_weights[:, layer + 1 :] = torch.rand(scrambled.gate_weights[:, layer + 1 :].shape)
        context = scrambled.context(layer)
        assert context.expert_ids.shape[1] == layer + 1
        for predictor in predictors:
            torch.testing.assert_close(predictor.predict_proba(batch.context(layer)), predictor.predict_proba(context))


def test_checkpoint_each_epoch_and_exact_resume(synthetic_splits, tmp_path, monkeypatch):
    """Killed after its second epoch's checkpoint, then resumed: the same weights, to the bit,
    as a run never stopped (dropout draws from the RNG, whose state the checkpoint carries)."""
    from specmoe.training import loop

    train, val, _ = synthetic_splits
    settings = {**TINY, "epochs": 3, "dropout": 0.2, "max_steps_per_epoch": 8, "patience": 5}
    whole = make_predictor("interlayer", **settings).fit(train, val, out_dir=tmp_path / "whole", progress=False)
    real_save = loop.save_checkpoint

    def save_then_die(out_dir, epoch, *args):
        real_save(out_dir, epoch, *args)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_predictor("interlayer", **settings).fit(train, val, out_dir=tmp_path / "cut", progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["epoch-0001", "epoch-0002"]
    torch.rand(7)  # whatever the process drew meanwhile must not matter
    resumed = make_predictor("interlayer", **settings).fit(
        train, val, out_dir=tmp_path / "cut", resume=True, progress=False
    )
    epochs = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if "epoch" in json.loads(line) and "event" not in json.loads(line)
    ]
    assert epochs == [1, 2, 3]  # the resumed run did only the third epoch
    assert resumed.training_summary_ == whole.training_summary_
    for (name, a), b in zip(whole.state_tensors().items(), resumed.state_tensors().values()):
        assert torch.equal(a, b), name


def test_resume_under_other_settings_is_refused(synthetic_splits, tmp_path):
    from specmoe.errors import InputError

    train, val, _ = synthetic_splits
    make_predictor("interlayer", **{**TINY, "epochs": 1}).fit(train, val, out_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="made with other settings or traces"):
        make_predictor("interlayer", **{**TINY, "epochs": 1, "lr": 1e-2}).fit(
            train, val, out_dir=tmp_path, resume=True, progress=False
        )


def test_non_finite_loss_rolls_back_then_stops_with_a_clear_message(synthetic_splits, monkeypatch):
    train, val, _ = synthetic_splits
    predictor = make_predictor("interlayer", **TINY)
    monkeypatch.setattr(
        type(predictor), "loss", lambda self, batch, layer: torch.tensor(float("nan"), requires_grad=True)
    )
    with pytest.raises(NonFiniteLossError, match="nan at step 0 again after rolling back"):
        predictor.fit(train, val, progress=False)


def test_saved_neural_predictor_reloads(synthetic_splits, tmp_path):
    train, val, test = synthetic_splits
    predictor = make_predictor("multiscale", **TINY).fit(train, val, progress=False)
    predictor.save(tmp_path / "p")
    loaded = load_predictor(tmp_path / "p")
    context = next(test.iter_batches(32)).context(2)
    torch.testing.assert_close(loaded.predict_proba(context), predictor.predict_proba(context))
    assert loaded.num_parameters() == predictor.num_parameters() > 0
