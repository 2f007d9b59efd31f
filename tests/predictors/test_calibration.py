"""Calibration: the isotonic map is non-decreasing and matches frequencies; a fitted
calibration turns a token table's scores into probabilities that a listed expert is needed
(better Brier score than the raw scores), survives a round trip through JSON, and is fitted
again when the traces differ."""

import numpy as np
import pytest

from specmoe.errors import InputError
from specmoe.predictors.calibration import CALIBRATION_FILE, Calibration, calibration_for, fit_calibration, isotonic
from specmoe.predictors.data import TraceDataset
from specmoe.predictors.registry import make_predictor
from tests.predictors.synthetic import make_synthetic_store


def test_isotonic_is_non_decreasing_and_fits_the_frequencies():
    rng = np.random.default_rng(0)
    x = rng.random(20000)
    y = (rng.random(20000) < x**2).astype(float)  # P(y | x) = x^2
    xs, ys = isotonic(x, y, bins=50)
    assert np.all(np.diff(ys) >= 0) and np.all(np.diff(xs) > 0)
    assert np.interp([0.2, 0.5, 0.9], xs, ys) == pytest.approx([0.04, 0.25, 0.81], abs=0.05)
    # a decreasing stretch is pooled flat
    xs, ys = isotonic(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.0, 1.0]), bins=4)
    assert ys.tolist() == [0.0, 0.5, 0.5, 1.0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("cal"), num_layers=4, num_experts=16, top_k=2, noise=0.3)


def test_a_calibration_turns_scores_into_probabilities_of_being_needed(store, tmp_path):
    token = make_predictor("token", horizons=3).fit(TraceDataset(store, "train"))
    calibration = fit_calibration(token, TraceDataset(store, "val"))
    source = calibration.source
    assert len(calibration.scores) == 3 and source["split"] == "val" and source["tokens"] > 0
    assert all(after < before for before, after in zip(source["brier_before"], source["brier_after"]))
    # on held-out tokens: closer to what is needed than the scores, and k experts expected
    test = next(TraceDataset(store, "test").iter_batches(4096))
    scores = token.predict_proba(test.context(0)).numpy()
    probs = calibration.apply(scores)[:, 0]  # layer 1
    needed = np.zeros_like(probs, dtype=bool)
    np.put_along_axis(needed, test.expert_ids[:, 1].numpy(), True, -1)
    assert np.mean((probs - needed) ** 2) < np.mean((scores[:, 0] - needed) ** 2)
    assert probs.sum(-1).mean() == pytest.approx(2.0, rel=0.25)  # top-2: two needed per layer
    # JSON round trip, and a far horizon falls back to the farthest fitted
    calibration.save(tmp_path)
    loaded = Calibration.load(tmp_path)
    scores = np.random.default_rng(0).random((5, 4, 16)).astype(np.float32)
    assert np.allclose(loaded.apply(scores), calibration.apply(scores), atol=1e-5)
    assert np.allclose(calibration.apply(scores[:, :1], [7]), calibration.apply(scores[:, :1], [3]))


def test_a_calibration_is_fitted_once_per_traces_and_a_bad_file_is_a_clear_error(store, tmp_path, tmp_path_factory):
    token = make_predictor("token", horizons=2).fit(TraceDataset(store, "train"))
    said = []
    first = calibration_for(token, tmp_path, store, log=said.append)
    assert (tmp_path / CALIBRATION_FILE).is_file() and len(said) == 1
    again = calibration_for(token, tmp_path, store, log=said.append)
    assert len(said) == 1 and again.source == first.source  # read back, not fitted again
    other = make_synthetic_store(tmp_path_factory.mktemp("other"), num_layers=4, num_experts=16, top_k=2, seed=1)
    calibration_for(token, tmp_path, other, log=said.append)
    assert len(said) == 2 and Calibration.load(tmp_path).source["traces"] == str(other.directory)
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not a valid calibration"):
        Calibration.load(tmp_path)
