"""Mixtures of member predictors: ``P = sum_m w[h, m] * P_m``.

``combo`` fits its weights by EM on validation data (the classic recipe for interpolating
n-gram models); ``ensemble`` (in ``neural/``) derives them from members' validation scores.
"""

from __future__ import annotations

import torch

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset


class MixturePredictor(ExpertPredictor):
    """Shared state of the mixtures: fitted ``members_`` and ``weights_`` (H, M)."""

    members: tuple[str, ...] = ()

    def make_member(self, spec: str) -> ExpertPredictor:
        from specmoe.predictors.registry import make_predictor

        name, _, preset = spec.partition(":")
        return make_predictor(name, preset or None, horizons=self.horizons)

    @property
    def needs_hidden(self):  # type: ignore[override]
        return next((m for m in (self.make_member(s).needs_hidden for s in self.members) if m), None)

    @property
    def previous_tokens(self) -> int:  # type: ignore[override]
        return max(self.make_member(s).previous_tokens for s in self.members)

    def member_probs(self, context: Context) -> torch.Tensor:
        probs = [m.predict_proba(context) for m in self.members_]
        return torch.stack([p / p.sum(-1, keepdim=True).clamp_min(1e-12) for p in probs], dim=-2)  # (N, H, M, E)

    def predict_proba(self, context: Context) -> torch.Tensor:
        return (self.member_probs(context) * self.weights_[None, :, :, None]).sum(-2)

    def fitted_meta(self) -> dict:
        if not hasattr(self, "weights_"):
            return {}
        return {
            "num_layers": self.num_layers_,
            "num_experts": self.num_experts_,
            "members": [m.fitted_meta() for m in self.members_],
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = {"weights": self.weights_}
        for i, member in enumerate(self.members_):
            state.update({f"m{i}.{k}": v for k, v in member.state_tensors().items()})
        return state

    def load_state_tensors(self, tensors, meta) -> None:
        self.weights_ = tensors["weights"]
        self.num_layers_, self.num_experts_ = meta["num_layers"], meta["num_experts"]
        self.members_ = []
        for i, (spec, member_meta) in enumerate(zip(self.members, meta["members"])):
            member = self.make_member(spec)
            prefix = f"m{i}."
            member.load_state_tensors(
                {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, member_meta
            )
            self.members_.append(member)

    def num_parameters(self) -> int:
        return sum(m.num_parameters() for m in self.members_) if hasattr(self, "members_") else 0


class InterpolatedPredictor(MixturePredictor):
    """Linear interpolation of counting predictors, one weight vector per horizon, fitted by
    EM to maximise the likelihood of the true experts on val (on train if no val)."""

    name = "combo"

    def __init__(
        self,
        *,
        horizons: int = 3,
        members: tuple[str, ...] = ("popularity", "transition", "ngram", "token"),
        em_iterations: int = 30,
    ):
        self.horizons = horizons
        self.members = tuple(members)
        self.em_iterations = em_iterations

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        self.members_ = [self.make_member(spec).fit(train) for spec in self.members]
        self.num_layers_, self.num_experts_ = train.num_layers, train.num_experts
        likelihoods: list[list[torch.Tensor]] = [[] for _ in range(self.horizons)]
        for batch in (val or train).iter_batches():
            for layer in range(self.num_layers_ - 1):
                probs = self.member_probs(batch.context(layer))  # (N, H, M, E)
                targets = batch.targets(layer, self.horizons)  # (N, H, k)
                for h in range(self.horizons):
                    rows, slots = (targets[:, h] >= 0).nonzero(as_tuple=True)
                    if len(rows):
                        likelihoods[h].append(probs[rows, h, :, targets[rows, h, slots]])  # (n, M)
        weights = torch.full((self.horizons, len(self.members)), 1 / len(self.members))
        for h, parts in enumerate(likelihoods):
            if not parts:
                continue
            lik = torch.cat(parts)
            for _ in range(self.em_iterations):
                resp = lik * weights[h]
                weights[h] = (resp / resp.sum(-1, keepdim=True).clamp_min(1e-30)).mean(0)
        self.weights_ = weights
        return self
