"""Learned lookahead: a small network on layer l's hidden state plus its routing history,
predicting layers l+1..l+H (the learned counterpart of :class:`RouterLookaheadPredictor`)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from specmoe.predictors.data import Context
from specmoe.predictors.neural.base import PredictorModule, TorchPredictor, embed_routing


class LookaheadModule(PredictorModule):
    def __init__(
        self,
        *,
        hidden_size: int,
        num_layers: int,
        num_experts: int,
        horizons: int,
        width: int,
        context_layers: int,
        dropout: float,
    ):
        super().__init__()
        self.num_experts, self.horizons, self.context_layers = num_experts, horizons, context_layers
        self.input_norm = nn.RMSNorm(hidden_size)
        self.project = nn.Linear(hidden_size, width)
        self.expert_embedding = nn.Embedding(num_experts + 1, width)
        self.layer_embedding = nn.Embedding(num_layers, width)
        self.body = nn.Sequential(
            nn.LayerNorm(width),
            nn.Linear(width, 2 * width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(2 * width, width),
        )
        self.heads = nn.Linear(width, horizons * num_experts)
        self.confidence = nn.Linear(width, horizons)

    def forward(self, context: Context):
        x = self.project(self.input_norm(context.hidden[:, -1].float())) + self.layer_embedding.weight[context.layer]
        for back in range(min(self.context_layers, context.layer + 1)):
            src = context.layer - back
            x = x + embed_routing(
                self.expert_embedding, context.expert_ids[:, src], context.gate_weights[:, src], self.num_experts
            )
        x = x + self.body(x)
        logits = self.heads(x).view(-1, self.horizons, self.num_experts)
        return logits, self.confidence(x)


class LookaheadMLPPredictor(TorchPredictor):
    """A small MLP from layer l's hidden state and the routing of its last layers to the
    experts of layers l+1..l+H (learned from scratch, not started at the lookahead)."""

    name = "lookahead-mlp"
    training_defaults: ClassVar[dict] = {"batch_size": 512}

    def __init__(
        self,
        *,
        horizons: int = 3,
        hidden: str = "residual_out",
        width: int = 256,
        context_layers: int = 2,
        dropout: float = 0.1,
        **training,
    ):
        super().__init__(horizons=horizons, **(self.training_defaults | training))
        self.hidden, self.width, self.context_layers, self.dropout = hidden, width, context_layers, dropout

    @property
    def needs_hidden(self) -> str:  # type: ignore[override]
        return self.hidden

    def fit(self, train, val=None, **kw):
        self.hidden_size_ = train.store.manifest.model.hidden_size
        return super().fit(train, val, **kw)

    def build_module(self, num_layers, num_experts, top_k):
        return LookaheadModule(
            hidden_size=self.hidden_size_,
            num_layers=num_layers,
            num_experts=num_experts,
            horizons=self.horizons,
            width=self.width,
            context_layers=self.context_layers,
            dropout=self.dropout,
        )

    def fitted_meta(self):
        meta = super().fitted_meta()
        return {**meta, "hidden_size": self.hidden_size_} if meta else meta

    def load_state_tensors(self, tensors, meta):
        self.hidden_size_ = meta["hidden_size"]
        super().load_state_tensors(tensors, meta)
