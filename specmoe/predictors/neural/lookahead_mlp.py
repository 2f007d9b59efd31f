"""Learned lookahead: a small network on layer l's hidden state plus its routing history,
predicting layers l+1..l+H (the learned counterpart of :class:`RouterLookaheadPredictor`)."""

from __future__ import annotations

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
    name = "lookahead-mlp"

    def __init__(
        self,
        *,
        horizons: int = 3,
        hidden: str = "residual_out",
        width: int = 256,
        context_layers: int = 2,
        dropout: float = 0.1,
        epochs: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        batch_size: int = 512,
        warmup_fraction: float = 0.05,
        grad_clip: float = 1.0,
        patience: int = 3,
        max_steps_per_epoch: int | None = None,
        focal_gamma: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(
            horizons=horizons,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            warmup_fraction=warmup_fraction,
            grad_clip=grad_clip,
            patience=patience,
            max_steps_per_epoch=max_steps_per_epoch,
            focal_gamma=focal_gamma,
            seed=seed,
        )
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
