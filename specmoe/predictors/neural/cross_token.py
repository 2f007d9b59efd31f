"""The next token's first layers, learned on top of today's next-token prefetch.

Starts exactly at :class:`NextTokenTablePredictor` (the token table read at the logit lens's
guesses) and learns, per source layer l of token t and next-token layer j::

    logits[l, j] = exp(gain[l, j]) * log(table[guesses, j])        # the guess's table row
                 + up[l, j] @ gelu(down[l] @ rms(x_l))               # what the stream adds
                 + routing(token t, layer j) @ carry[l, j]           # routing repeats across tokens
                 + bias[l, j]

with ``up``, ``carry``, ``gain`` and ``bias`` at zero to begin with, trained with the ranking
loss on token t+1's routing (``RoutingBatch.next_expert_ids``, which no Context holds).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from specmoe.predictors.cross_token import CrossTokenMixin, NextTokenTablePredictor
from specmoe.predictors.data import Context, RoutingBatch
from specmoe.predictors.neural.base import PredictorModule, TorchPredictor, ranking_loss
from specmoe.predictors.neural.corrected import CORRECTION_TRAINING, routing_weights


class NextTokenModule(PredictorModule):
    def __init__(self, *, hidden_size: int, num_layers: int, num_experts: int, depth: int, reach: int, rank: int):
        super().__init__()
        self.first_source, self.num_experts, self.depth = num_layers - reach, num_experts, depth
        self.down = nn.Parameter(torch.randn(reach, rank, hidden_size) / hidden_size**0.5)
        self.up = nn.Parameter(torch.zeros(reach, depth, num_experts, rank))
        self.carry = nn.Parameter(torch.zeros(reach, depth, num_experts, num_experts))
        self.gain = nn.Parameter(torch.zeros(reach, depth))
        self.bias = nn.Parameter(torch.zeros(reach, depth, num_experts))

    def forward(self, context: Context, table_rows: torch.Tensor) -> torch.Tensor:
        """Logits (N, depth, E) from token t's context and its guesses' table rows (N, depth, E)."""
        source = context.layer - self.first_source
        state = context.hidden[:, -1].float()
        unit = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = self.gain[source].exp()[None, :, None] * torch.log(table_rows.float().clamp_min(1e-6))
        logits = logits + torch.einsum("nr,jer->nje", nn.functional.gelu(unit @ self.down[source].T), self.up[source])
        own = torch.zeros(len(context), self.depth, self.num_experts)  # token t's own routing at those layers
        for j in range(min(self.depth, context.layer + 1)):
            own[:, j] = routing_weights(context.expert_ids[:, j], context.gate_weights[:, j], self.num_experts)
        return logits + torch.einsum("nji,jie->nje", own, self.carry[source]) + self.bias[source]


class NextTokenCorrectedPredictor(CrossTokenMixin, TorchPredictor):
    """The token table at the logit lens's guesses, corrected by a low-rank map of token t's
    residual stream and token t's own routing; starts at the table, trained with the ranking loss."""

    name = "next-token-corrected"
    needs_hidden = "residual_out"
    fits_cpu = True
    training_defaults: ClassVar[dict] = CORRECTION_TRAINING

    def __init__(
        self,
        *,
        depth: int = 3,
        reach: int = 3,
        candidates: int = 1,
        rank: int = 128,
        model: str | None = None,
        **training,
    ):
        super().__init__(horizons=depth, **(self.training_defaults | training))
        self.depth, self.reach, self.candidates, self.rank, self.model = depth, reach, candidates, rank, model

    def fit(self, train, val=None, **kw):
        self.guide_ = NextTokenTablePredictor(
            depth=self.depth, reach=self.reach, candidates=self.candidates, model=self.model
        ).fit(train)
        self.hidden_size_ = train.store.manifest.model.hidden_size
        return super().fit(train, val, **kw)

    def build_module(self, num_layers, num_experts, top_k):
        return NextTokenModule(
            hidden_size=self.hidden_size_,
            num_layers=num_layers,
            num_experts=num_experts,
            depth=min(self.depth, num_layers),
            reach=min(self.reach, num_layers),
            rank=self.rank,
        )

    def guess(self, context: Context):
        return self.guide_.guess(context)

    def loss(self, batch: RoutingBatch, layer: int) -> torch.Tensor:
        has_next = (batch.next_expert_ids[:, 0, 0] >= 0).nonzero()[:, 0]
        context = batch.context(layer).select(has_next)
        logits = self.module_(context, self.guide_.predict_next(context))
        return ranking_loss(logits, batch.next_expert_ids[has_next, : logits.shape[1]])

    def predict_next(self, context: Context) -> torch.Tensor:
        self.check_fitted()
        self.module_.eval()
        with torch.no_grad():
            return torch.softmax(self.module_(context, self.guide_.predict_next(context)), -1)

    def fitted_meta(self):
        meta = super().fitted_meta()
        return {**meta, "hidden_size": self.hidden_size_, "guide": self.guide_.fitted_meta()} if meta else meta

    def state_tensors(self):
        return {**super().state_tensors(), **{f"guide.{k}": v for k, v in self.guide_.state_tensors().items()}}

    def load_state_tensors(self, tensors, meta):
        self.hidden_size_ = meta["hidden_size"]
        self.guide_ = NextTokenTablePredictor(depth=self.depth, reach=self.reach, candidates=self.candidates)
        self.guide_.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("guide.")}, meta["guide"])
        super().load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("guide.")}, meta)
