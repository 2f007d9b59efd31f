"""Mixtures of member predictors.

``combo`` mixes probabilities, ``P = sum_m w[h, m] * P_m``, with weights fitted by EM on
validation data (the classic recipe for interpolating n-gram models); ``ensemble`` (in
``neural/``) derives them from members' validation scores. ``stack`` combines log-probabilities
with weights learned on validation data for the ranking: members that rank well but are
calibrated differently (a copied router's softmax, a count table) are rescaled rather than
averaged.
"""

from __future__ import annotations

import torch

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset


class MixturePredictor(ExpertPredictor):
    """Shared state of the mixtures: fitted ``members_`` and ``weights_`` (H, M)."""

    members: tuple[str, ...] = ()
    member_params: dict[str, dict] | None = None
    """Constructor arguments per member spec (e.g. a training budget), if any."""

    def make_member(self, spec: str) -> ExpertPredictor:
        from specmoe.predictors.registry import make_predictor

        name, _, preset = spec.partition(":")
        extra = (self.member_params or {}).get(spec, {})
        return make_predictor(name, preset or None, horizons=self.horizons, **extra)

    def fit_members(self, train: TraceDataset, val: TraceDataset | None) -> None:
        """Fit every member on train (val for the early stopping of those that train)."""
        self.members_ = [self.make_member(spec).fit(train, val) for spec in self.members]
        self.num_layers_, self.num_experts_ = train.num_layers, train.num_experts

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
        self.fit_members(train, val)
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


class StackingPredictor(MixturePredictor):
    """A log-linear stack: ``scores = sum_m w[l, h, m] * log P_m``, one weight per member,
    source layer and horizon, fitted on validation data with the ranking loss. It starts at
    the member with the best validation recall@k at each horizon and keeps, per horizon,
    whichever of the fit and that member ranks better on validation: adding a member can
    rescale or ignore it, not make the stack worse there than its best member."""

    name = "stack"

    def __init__(
        self,
        *,
        horizons: int = 3,
        members: tuple[str, ...] = ("lookahead-corrected", "token", "ngram"),
        member_params: dict | None = None,
        max_tokens: int = 16384,
        steps: int = 300,
        lr: float = 0.05,
    ):
        self.horizons = horizons
        self.members = tuple(members)
        self.member_params = member_params or {}
        self.max_tokens, self.steps, self.lr = max_tokens, steps, lr

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        from specmoe.predictors.neural.base import ranking_loss

        self.fit_members(train, val)
        logs, targets = self._validation_inputs(val or train)  # per source layer: (N, H, M, E), (N, H, k)
        sources, members = len(logs), len(self.members_)
        one_hot = torch.eye(members)
        alone = torch.stack(
            [self._recall(logs, targets, one_hot[m].expand(sources, self.horizons, -1)) for m in range(members)]
        )
        best = alone.argmax(0)  # (H,) the best member at each horizon
        start = one_hot[best].expand(sources, -1, -1).clone()
        weights = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weights], lr=self.lr)
        for _ in range(self.steps):
            optimizer.zero_grad()
            loss = sum(
                ranking_loss((log_p * weights[layer][None, :, :, None]).sum(2), true)
                for layer, (log_p, true) in enumerate(zip(logs, targets))
            )
            loss.backward()
            optimizer.step()
        weights = weights.detach()
        worse = self._recall(logs, targets, weights) < alone[best, torch.arange(self.horizons)]
        weights[:, worse] = start[:, worse]
        self.weights_ = weights
        self.member_scores_ = alone  # (M, H) each member's validation recall@k
        self.stack_scores_ = self._recall(logs, targets, weights)
        return self

    def member_log_probs(self, context: Context) -> torch.Tensor:
        """(N, H, M, E) the members' log-probabilities. A member trained for ranking puts
        experts 90 nats apart, so only the smallest normal float is a safe floor: a larger one
        (1e-9 was tried) ties every expert below it and loses their order."""
        return self.member_probs(context).clamp_min(torch.finfo(torch.float32).tiny).log()

    def _recall(self, logs: list[torch.Tensor], targets: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """(H,) recall@k of the stack with ``weights`` (S, H, M), pooled over source layers."""
        from specmoe.predictors.metrics import token_metrics

        hits, count = torch.zeros(self.horizons), torch.zeros(self.horizons)
        for layer, (log_p, true) in enumerate(zip(logs, targets)):
            scores = (log_p * weights[layer][None, :, :, None]).sum(2)
            for h in range(self.horizons):
                rows = true[:, h, 0] >= 0
                if rows.any():
                    hits[h] += token_metrics(scores[rows, h], true[rows, h], true.shape[-1])["recall_at_k"].sum()
                    count[h] += rows.sum()
        return hits / count.clamp_min(1)

    def _validation_inputs(self, data: TraceDataset) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Members' log-probabilities and the true experts of about ``max_tokens`` tokens drawn
        from every document of ``data`` alike, per source layer."""
        keep = min(1.0, self.max_tokens / max(data.num_tokens(), 1))
        generator = torch.Generator().manual_seed(0)
        logs: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers_ - 1)]
        targets: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers_ - 1)]
        with torch.no_grad():
            for batch in data.iter_batches(4096):
                rows = (torch.rand(len(batch), generator=generator) < keep).nonzero()[:, 0]
                for layer in range(self.num_layers_ - 1):
                    logs[layer].append(self.member_log_probs(batch.context(layer).select(rows)))
                    targets[layer].append(batch.targets(layer, self.horizons)[rows])
        return [torch.cat(parts) for parts in logs], [torch.cat(parts) for parts in targets]

    def predict_proba(self, context: Context) -> torch.Tensor:
        log_p = self.member_log_probs(context)  # (N, H, M, E)
        layer = min(context.layer, self.weights_.shape[0] - 1)
        return torch.softmax((log_p * self.weights_[layer][None, :, :, None]).sum(2), -1)

    def fitted_meta(self):
        meta = super().fitted_meta()
        if not meta:
            return meta
        return {**meta, "member_scores": self.member_scores_.tolist(), "stack_scores": self.stack_scores_.tolist()}

    def load_state_tensors(self, tensors, meta):
        super().load_state_tensors(tensors, meta)
        self.member_scores_ = torch.tensor(meta["member_scores"])
        self.stack_scores_ = torch.tensor(meta["stack_scores"])
