"""Ensemble: members fitted on train, fused with weights from their validation scores."""

from __future__ import annotations

import torch

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset


class EnsemblePredictor(ExpertPredictor):
    """``P = sum_m w_m P_m`` with ``w = softmax(val_recall_at_k / temperature)``; the members'
    own validation scores are kept in ``member_scores_`` so each can be reported."""

    name = "ensemble"

    def __init__(self, *, horizons: int = 3, members: tuple[str, ...] = ("ngram", "interlayer:small"),
                 temperature: float = 0.02, member_params: dict | None = None):
        self.horizons = horizons
        self.members = tuple(members)
        self.temperature = temperature
        self.member_params = member_params or {}

    def _make(self, spec: str):
        from specmoe.predictors.registry import make_predictor

        name, _, preset = spec.partition(":")
        return make_predictor(name, preset or None, horizons=self.horizons, **self.member_params.get(spec, {}))

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        self.members_ = [self._make(spec).fit(train, val) for spec in self.members]
        scored_on = val or train
        self.member_scores_ = torch.tensor([m.score(scored_on) for m in self.members_])
        self.weights_ = torch.softmax(self.member_scores_ / self.temperature, 0)
        self.num_layers_, self.num_experts_ = train.num_layers, train.num_experts
        return self

    def predict_proba(self, context: Context) -> torch.Tensor:
        probs = [m.predict_proba(context) for m in self.members_]
        return sum(w * p / p.sum(-1, keepdim=True).clamp_min(1e-12) for w, p in zip(self.weights_, probs))

    @property
    def needs_hidden(self):  # type: ignore[override]
        return next((m for m in (getattr(self._make(s), "needs_hidden", None) for s in self.members) if m), None)

    @property
    def previous_tokens(self) -> int:  # type: ignore[override]
        return max(self._make(s).previous_tokens for s in self.members)

    def fitted_meta(self):
        if not hasattr(self, "weights_"):
            return {}
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_,
                "members": [m.fitted_meta() for m in self.members_], "member_scores": self.member_scores_.tolist()}

    def state_tensors(self):
        state = {"weights": self.weights_}
        for i, member in enumerate(self.members_):
            state.update({f"m{i}.{k}": v for k, v in member.state_tensors().items()})
        return state

    def load_state_tensors(self, tensors, meta):
        self.weights_ = tensors["weights"]
        self.member_scores_ = torch.tensor(meta["member_scores"])
        self.num_layers_, self.num_experts_ = meta["num_layers"], meta["num_experts"]
        self.members_ = []
        for i, (spec, member_meta) in enumerate(zip(self.members, meta["members"])):
            member = self._make(spec)
            prefix = f"m{i}."
            member.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                      member_meta)
            self.members_.append(member)

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members_) if hasattr(self, "members_") else 0
