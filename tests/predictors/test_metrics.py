"""The literature's metrics: exact match of the top-k set and recall at widened budgets."""

import math

import pytest
import torch

from specmoe.predictors.metrics import chance_levels, token_metrics


def test_exact_match_and_recall_widths_count_the_ranked_experts():
    # 8 experts, k = 2; true sets {0, 1} and {2, 7}; scores rank 0, 1, 2, 3, ... 7
    scores = torch.arange(8, 0, -1).float().expand(2, -1)
    true = torch.tensor([[0, 1], [2, 7]])
    values = token_metrics(scores, true, top_k=2)
    assert values["exact_match"].tolist() == [1.0, 0.0]
    assert values["recall_at_k"].tolist() == [1.0, 0.0]
    assert values["recall_at_1.5k"].tolist() == [1.0, 0.5]  # m = 3 covers expert 2
    assert values["recall_at_2k"].tolist() == [1.0, 0.5]
    assert values["recall_at_3k"].tolist() == [1.0, 0.5]  # m = 6 stops short of expert 7


def test_a_dropped_slot_leaves_the_rest_of_the_set_to_match():
    scores = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    values = token_metrics(scores, torch.tensor([[1, -1]]), top_k=2)
    assert values["exact_match"].item() == 1.0 and values["recall_at_k"].item() == 1.0


@pytest.mark.parametrize(("experts", "top_k"), [(64, 8), (32, 2), (128, 1)])
def test_chance_levels_match_a_random_ranking(experts, top_k):
    chance = chance_levels(experts, top_k)
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(20000, experts, generator=generator)
    true = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(20000)])
    values = token_metrics(scores, true, top_k)
    for name in ("hit1", "recall_at_k", "recall_at_1.5k", "recall_at_3k"):
        assert values[name].mean().item() == pytest.approx(chance[name], abs=0.01)
    assert chance["exact_match"] == pytest.approx(1 / math.comb(experts, top_k))
