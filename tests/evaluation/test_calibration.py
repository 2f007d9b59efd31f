import numpy as np
import pytest
import torch

from specmoe.predictors.metrics import CalibrationAccumulator


def test_reliability_bins_by_hand():
    cal = CalibrationAccumulator(bins=4)
    # confidence = best score / row sum: 0.9, 0.9, 0.5 (unnormalised row), 0.6; one of the 0.9s is wrong
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.3], [0.6, 0.4]])
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    cal.add(1, scores, correct)
    (row,) = cal.rows()
    assert row["n"] == [0, 0, 2, 2]  # 0.5 and 0.6 in [0.5, 0.75); 0.9 twice in [0.75, 1]
    assert row["mean_confidence"][2] == pytest.approx(0.55) and row["accuracy"][2] == 1.0
    assert row["mean_confidence"][3] == pytest.approx(0.9) and row["accuracy"][3] == 0.5
    assert row["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.4)


def test_a_calibrated_predictor_has_small_ece():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.05, 0.95, 20000)
    scores = torch.tensor(np.stack([confidence, 1 - confidence], 1), dtype=torch.float32)
    correct = torch.tensor(rng.uniform(size=20000) < np.maximum(confidence, 1 - confidence), dtype=torch.float32)
    cal = CalibrationAccumulator()
    cal.add(1, scores, correct)
    assert cal.rows()[0]["ece"] < 0.02
    overconfident = CalibrationAccumulator()
    overconfident.add(1, scores, torch.zeros(20000))
    assert overconfident.rows()[0]["ece"] > 0.5
