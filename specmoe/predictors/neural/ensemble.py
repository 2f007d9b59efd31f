"""Ensemble: members fitted on train, fused with weights from their validation scores."""

from __future__ import annotations

import torch

from specmoe.predictors.combination import MixturePredictor
from specmoe.predictors.data import TraceDataset


class EnsemblePredictor(MixturePredictor):
    """``P = sum_m w_m P_m`` with ``w = softmax(val_recall_at_k / temperature)``; the members'
    own validation scores are kept in ``member_scores_`` so each can be reported."""

    name = "ensemble"

    def __init__(
        self,
        *,
        horizons: int = 3,
        members: tuple[str, ...] = ("ngram", "interlayer:small"),
        temperature: float = 0.02,
        member_params: dict | None = None,
    ):
        self.horizons = horizons
        self.members = tuple(members)
        self.temperature = temperature
        self.member_params = member_params or {}

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        self.fit_members(train, val)
        scored_on = val or train
        self.member_scores_ = torch.tensor([m.score(scored_on) for m in self.members_])
        self.weights_ = torch.softmax(self.member_scores_ / self.temperature, 0).expand(self.horizons, -1).clone()
        return self

    def fitted_meta(self):
        meta = super().fitted_meta()
        return {**meta, "member_scores": self.member_scores_.tolist()} if meta else meta

    def load_state_tensors(self, tensors, meta):
        super().load_state_tensors(tensors, meta)
        self.member_scores_ = torch.tensor(meta["member_scores"])
