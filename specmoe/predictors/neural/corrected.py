"""The router lookahead, corrected by what training on traces can add.

Layer l+h's own norm and router applied to layer l's residual stream (the training-free
``lookahead``) is the strongest signal one layer ahead, but the stream still changes on its
way to layer l+h. This predictor keeps those logits and learns what they miss, per source
layer l and horizon h::

    logits[l, h] = exp(gain[l, h]) * lookahead[l, l+h]          # the copied router, rescaled
                 + up[l, h] @ gelu(down[l] @ rms(x_l))          # low-rank correction of the stream
                 + routing(l) @ transition[l, h]                # the experts layer l chose
                 + routing(previous token, l+h) @ neighbour[l, h]   # optional
                 + bias[l, h]

``up``, ``transition``, ``neighbour``, ``bias`` and ``gain`` start at zero, so an untrained
predictor is exactly the lookahead and training can only move away from it where the loss
says so. The loss is the pairwise ranking loss of :func:`ranking_loss`, which rewards what
recall@k counts: the true experts above the others.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from specmoe.errors import InputError
from specmoe.predictors.data import Context, RoutingBatch
from specmoe.predictors.lookahead import extract_routers, lookahead_logits
from specmoe.predictors.neural.base import PredictorModule, TorchPredictor, predictor_loss, ranking_loss

ROUTER_TENSORS = ("norm", "router", "bias", "eps")
CORRECTION_TRAINING = {
    "epochs": 16,
    "lr": 1e-2,
    "weight_decay": 0.0,
    "batch_size": 1024,
    "patience": 3,
    "warmup_fraction": 0.02,
}
"""Training of a correction that starts at a training-free predictor: few parameters, large
batches, a few epochs to converge on 2 CPU cores (docs/predictors.md has the curves)."""


def routing_weights(expert_ids: torch.Tensor, gate_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, k) ids and gate weights -> (N, E) gate weights, normalised per token; dropped (-1)
    and padding (IGNORE) slots add nothing."""
    valid = expert_ids >= 0
    weights = torch.where(valid, gate_weights.float(), 0.0)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    return torch.zeros(len(expert_ids), num_experts).scatter_add_(1, expert_ids.clamp_min(0), weights)


class CorrectedLookaheadModule(PredictorModule):
    def __init__(
        self,
        *,
        routers: dict[str, torch.Tensor],
        hidden: str,
        horizons: int,
        rank: int,
        neighbour: bool,
    ):
        super().__init__()
        for name in ROUTER_TENSORS:  # copied from the model, saved with the predictor, never trained
            self.register_buffer(f"router_{name}", routers[name].float().clone())
        num_layers, num_experts, hidden_size = routers["router"].shape
        sources = max(num_layers - 1, 1)
        self.hidden, self.horizons, self.num_layers, self.num_experts = hidden, horizons, num_layers, num_experts
        self.down = nn.Parameter(torch.randn(sources, rank, hidden_size) / hidden_size**0.5)
        self.up = nn.Parameter(torch.zeros(sources, horizons, num_experts, rank))
        self.transition = nn.Parameter(torch.zeros(sources, horizons, num_experts, num_experts))
        self.neighbour = nn.Parameter(torch.zeros(sources, horizons, num_experts, num_experts)) if neighbour else None
        self.gain = nn.Parameter(torch.zeros(sources, horizons))
        self.bias = nn.Parameter(torch.zeros(sources, horizons, num_experts))

    @property
    def routers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"router_{name}") for name in ROUTER_TENSORS}

    def forward(self, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        layer, n, e = context.layer, len(context), self.num_experts
        state = context.hidden[:, -1].float()  # (N, D)
        base = torch.zeros(n, self.horizons, e)
        targets = [layer + h for h in range(1, self.horizons + 1) if layer + h < self.num_layers]
        for h, target in enumerate(targets):
            base[:, h] = lookahead_logits(self.routers, state, layer, target, self.hidden)
        source = min(layer, self.down.shape[0] - 1)  # the last layer has no target; any weights do
        unit = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6)
        low_rank = nn.functional.gelu(unit @ self.down[source].T)  # (N, r)
        logits = self.gain[source].exp()[None, :, None] * base
        logits = logits + torch.einsum("nr,her->nhe", low_rank, self.up[source])
        current = routing_weights(context.expert_ids[:, -1], context.gate_weights[:, -1], e)
        logits = logits + torch.einsum("ni,hij->nhj", current, self.transition[source]) + self.bias[source]
        if self.neighbour is not None and context.prev_expert_ids.shape[1] > 0:
            previous = torch.zeros(n, self.horizons, e)
            for h, target in enumerate(targets):
                ids = context.prev_expert_ids[:, 0, target]
                previous[:, h] = routing_weights(ids, torch.ones(ids.shape), e)
            logits = logits + torch.einsum("nhi,hij->nhj", previous, self.neighbour[source])
        top = torch.softmax(logits, -1).max(-1).values.clamp(1e-6, 1 - 1e-6)
        return logits, torch.log(top) - torch.log1p(-top)  # confidence: the top expert's own probability


class CorrectedLookaheadPredictor(TorchPredictor):
    """The router lookahead plus a learned low-rank correction from the residual stream and the
    current routing, starting exactly at the lookahead; trained with a ranking loss."""

    name = "lookahead-corrected"
    fits_cpu = True
    training_defaults: ClassVar[dict] = CORRECTION_TRAINING

    def __init__(
        self,
        *,
        horizons: int = 3,
        hidden: str = "residual_out",
        rank: int = 128,
        neighbour: bool = False,
        objective: str = "ranking",
        model: str | None = None,
        **training,
    ):
        super().__init__(horizons=horizons, **(self.training_defaults | training))
        self.hidden, self.rank, self.neighbour, self.objective, self.model = hidden, rank, neighbour, objective, model

    @property
    def needs_hidden(self) -> str:  # type: ignore[override]
        return self.hidden

    @property
    def previous_tokens(self) -> int:  # type: ignore[override]
        return int(self.neighbour)

    def fit(self, train, val=None, **kw):
        if self.hidden not in ("residual_out", "router_input"):
            raise InputError(f"hidden must be residual_out or router_input, got {self.hidden!r}")
        if self.objective not in ("ranking", "softmax"):
            raise InputError(f"objective must be ranking or softmax, got {self.objective!r}")
        self.routers_ = extract_routers(self.model or train.store.manifest.model.id, train.stack)
        self.hidden_size_ = self.routers_["router"].shape[2]
        return super().fit(train, val, **kw)

    def build_module(self, num_layers, num_experts, top_k):
        routers = getattr(self, "routers_", None) or {  # placeholders, for loading or counting
            "norm": torch.ones(num_layers, self.hidden_size_),
            "router": torch.zeros(num_layers, num_experts, self.hidden_size_),
            "bias": torch.zeros(num_layers, num_experts),
            "eps": torch.full((num_layers,), 1e-6),
        }
        return CorrectedLookaheadModule(
            routers=routers, hidden=self.hidden, horizons=self.horizons, rank=self.rank, neighbour=self.neighbour
        )

    def loss(self, batch: RoutingBatch, layer: int) -> torch.Tensor:
        logits, confidence = self.module_(batch.context(layer))
        targets = batch.targets(layer, self.horizons)
        if self.objective == "softmax":
            return predictor_loss(logits, confidence, targets, confidence_weight=0.0)
        return ranking_loss(logits, targets)

    def fitted_meta(self):
        meta = super().fitted_meta()
        return {**meta, "hidden_size": self.hidden_size_} if meta else meta

    def load_state_tensors(self, tensors, meta):
        self.hidden_size_ = meta["hidden_size"]
        self.__dict__.pop("routers_", None)
        super().load_state_tensors(tensors, meta)
        self.routers_ = self.module_.routers
