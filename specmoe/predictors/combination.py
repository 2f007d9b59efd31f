"""Linear interpolation of member predictors, one weight vector per horizon, fitted by EM
on validation data (the classic recipe for mixing n-gram models)."""

from __future__ import annotations

import torch

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset


class InterpolatedPredictor(ExpertPredictor):
    """``P = sum_m w[h, m] * P_m``. Members are fitted on train; weights maximise the
    likelihood of the true experts on val (on train if no val is given)."""

    name = "combo"

    def __init__(self, *, horizons: int = 3, members: tuple[str, ...] = ("popularity", "transition", "ngram", "token"),
                 em_iterations: int = 30):
        self.horizons = horizons
        self.members = tuple(members)
        self.em_iterations = em_iterations

    def _member_probs(self, context: Context) -> torch.Tensor:
        probs = [m.predict_proba(context) for m in self.members_]
        return torch.stack([p / p.sum(-1, keepdim=True).clamp_min(1e-12) for p in probs], dim=-2)  # (N, H, M, E)

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        from specmoe.predictors.registry import make_predictor

        self.members_ = [make_predictor(name, horizons=self.horizons).fit(train) for name in self.members]
        self.num_layers_, self.num_experts_ = train.num_layers, train.num_experts
        # E-step statistics: per horizon, the members' probability of each true expert.
        likelihoods: list[list[torch.Tensor]] = [[] for _ in range(self.horizons)]
        for batch in (val or train).iter_batches():
            for layer in range(self.num_layers_ - 1):
                probs = self._member_probs(batch.context(layer))  # (N, H, M, E)
                targets = batch.targets(layer, self.horizons)  # (N, H, k)
                for h in range(self.horizons):
                    ok = targets[:, h] >= 0
                    rows, slots = ok.nonzero(as_tuple=True)
                    if len(rows):
                        likelihoods[h].append(probs[rows, h, :, targets[rows, h, slots]])  # (n, M)
        weights = torch.full((self.horizons, len(self.members)), 1 / len(self.members))
        for h, parts in enumerate(likelihoods):
            if not parts:
                continue
            lik = torch.cat(parts)
            for _ in range(self.em_iterations):
                resp = lik * weights[h]
                resp = resp / resp.sum(-1, keepdim=True).clamp_min(1e-30)
                weights[h] = resp.mean(0)
        self.weights_ = weights
        return self

    def predict_proba(self, context: Context) -> torch.Tensor:
        return (self._member_probs(context) * self.weights_[None, :, :, None]).sum(-2)

    def fitted_meta(self):
        if not hasattr(self, "weights_"):
            return {}
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_,
                "members": [m.fitted_meta() for m in self.members_]}

    def state_tensors(self):
        state = {"weights": self.weights_}
        for i, member in enumerate(self.members_):
            state.update({f"m{i}.{k}": v for k, v in member.state_tensors().items()})
        return state

    def load_state_tensors(self, tensors, meta):
        from specmoe.predictors.registry import make_predictor

        self.weights_ = tensors["weights"]
        self.num_layers_, self.num_experts_ = meta["num_layers"], meta["num_experts"]
        self.members_ = []
        for i, (name, member_meta) in enumerate(zip(self.members, meta["members"])):
            member = make_predictor(name, horizons=self.horizons)
            prefix = f"m{i}."
            member.load_state_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                      member_meta)
            self.members_.append(member)
