"""The seed's inter-layer speculation transformer, and its multi-scale variant.

Input: one token per context layer (the gate-weighted embedding of that layer's experts plus
a layer-position embedding), one query token per horizon (a learned query plus the target
layer's position), and optionally the earlier tokens' routing at the target layers. A
transformer encoder mixes them (cross-layer attention); each query then reads a learned
pattern memory, and the expert and confidence heads score it.

Missing layers (before layer 0) use a learned padding embedding rather than an attention
mask: a fully masked row is what made the seed's multi-scale model produce NaN.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from specmoe.predictors.data import Context
from specmoe.predictors.neural.base import PredictorModule, TorchPredictor, embed_routing, predictor_loss


class InterLayerEncoder(nn.Module):
    """Routing of the last ``context_layers`` layers (+ neighbours) -> (N, H, d) query states."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        horizons: int,
        context_layers: int,
        d_model: int,
        heads: int,
        ff: int,
        depth: int,
        neighbour_tokens: int,
        dropout: float,
        embedding_noise: float,
        layer_dropout: float,
        expert_embedding: nn.Embedding,
        layer_embedding: nn.Embedding,
        cross_layer_attention: bool = True,
    ):
        super().__init__()
        self.cross_layer_attention = cross_layer_attention
        self.num_layers, self.num_experts, self.horizons = num_layers, num_experts, horizons
        self.context_layers, self.neighbour_tokens = context_layers, neighbour_tokens
        self.embedding_noise, self.layer_dropout = embedding_noise, layer_dropout
        # A tuple, not attributes: the embeddings belong to the parent module and are shared
        # by every branch; registering them here would save each one twice.
        self._shared = (expert_embedding, layer_embedding)
        self.queries = nn.Parameter(torch.randn(horizons, d_model) * 0.02)
        self.roles = nn.Embedding(3, d_model)  # context layer / query / neighbour token
        self.neighbour_position = nn.Embedding(max(neighbour_tokens, 1), d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)

    def tokens(self, context: Context) -> torch.Tensor:
        expert_embedding, layer_embedding = self._shared
        n, pad = len(context), self.num_experts
        layer = context.layer
        parts = []
        for back in range(self.context_layers - 1, -1, -1):
            src = layer - back
            if src >= 0:
                emb = embed_routing(expert_embedding, context.expert_ids[:, src], context.gate_weights[:, src], pad)
                emb = emb + layer_embedding.weight[src]
            else:
                emb = (expert_embedding.weight[pad] + layer_embedding.weight[self.num_layers]).expand(n, -1)
            parts.append(emb + self.roles.weight[0])
        targets = [min(layer + h, self.num_layers) for h in range(1, self.horizons + 1)]
        for h, target in enumerate(targets):
            parts.append((self.queries[h] + layer_embedding.weight[target] + self.roles.weight[1]).expand(n, -1))
        for p in range(self.neighbour_tokens):
            for target in targets:
                if target >= self.num_layers:
                    ids = torch.full((n, 1), -1, dtype=torch.long)
                else:
                    ids = context.prev_expert_ids[:, p, target]
                emb = embed_routing(expert_embedding, ids, torch.ones(ids.shape), pad)
                parts.append(
                    emb + layer_embedding.weight[target] + self.neighbour_position.weight[p] + self.roles.weight[2]
                )
        x = torch.stack(parts, dim=1)  # (N, S, d)
        if self.training and self.layer_dropout > 0:
            drop = torch.rand(n, self.context_layers, 1) < self.layer_dropout
            padded = expert_embedding.weight[pad] + self.roles.weight[0]
            x[:, : self.context_layers] = torch.where(drop, padded, x[:, : self.context_layers])
        if self.training and self.embedding_noise > 0:
            x = x + torch.randn_like(x) * self.embedding_noise
        return x

    def forward(self, context: Context, mix: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        x = self.tokens(context)
        if mix is not None:  # mixup of whole token sequences, paired by ``perm``
            perm, lam = mix
            x = lam * x + (1 - lam) * x[perm]
        if self.cross_layer_attention:
            x = self.encoder(x)
        else:  # the ablation: every token attends to itself only; queries get the context as a sum
            context_sum = x[:, : self.context_layers].sum(1, keepdim=True)
            x = torch.cat([x[:, : self.context_layers], x[:, self.context_layers :] + context_sum], 1)
            alone = ~torch.eye(x.shape[1], dtype=torch.bool)
            x = self.encoder(x, mask=alone)
        return x[:, self.context_layers : self.context_layers + self.horizons]  # (N, H, d)


class InterLayerModule(PredictorModule):
    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        horizons: int,
        context_windows: tuple[int, ...],
        d_model: int,
        heads: int,
        ff: int,
        depth: int,
        memory_slots: int,
        neighbour_tokens: int,
        dropout: float,
        embedding_noise: float,
        layer_dropout: float,
        cross_layer_attention: bool = True,
    ):
        super().__init__()
        self.expert_embedding = nn.Embedding(num_experts + 1, d_model)
        self.layer_embedding = nn.Embedding(num_layers + 1, d_model)
        self.branches = nn.ModuleList(
            InterLayerEncoder(
                num_layers=num_layers,
                num_experts=num_experts,
                horizons=horizons,
                context_layers=c,
                d_model=d_model,
                heads=heads,
                ff=ff,
                depth=depth,
                neighbour_tokens=neighbour_tokens,
                dropout=dropout,
                embedding_noise=embedding_noise,
                layer_dropout=layer_dropout,
                expert_embedding=self.expert_embedding,
                layer_embedding=self.layer_embedding,
                cross_layer_attention=cross_layer_attention,
            )
            for c in context_windows
        )
        self.scale_logits = nn.Parameter(torch.zeros(len(context_windows)))
        self.memory = nn.Parameter(torch.randn(max(memory_slots, 1), d_model) * 0.02)
        self.memory_slots = memory_slots
        self.memory_attention = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.expert_head = nn.Linear(d_model, num_experts)
        self.confidence_head = nn.Linear(d_model, 1)

    def forward(self, context: Context, mix=None):
        scales = torch.softmax(self.scale_logits, 0)
        q = sum(w * branch(context, mix) for w, branch in zip(scales, self.branches))  # (N, H, d)
        if self.memory_slots > 0:
            memory = self.memory.expand(q.shape[0], -1, -1)
            q = q + self.memory_attention(q, memory, memory, need_weights=False)[0]
        q = self.norm(q)
        return self.expert_head(q), self.confidence_head(q)[..., 0]


class InterLayerPredictor(TorchPredictor):
    """The seed's inter-layer speculation transformer (presets ``baseline``, ``enhanced``,
    ``improved``; ``small`` for CPU). Augmentations apply during training only.
    ``cross_layer_attention=False`` is an ablation: each token attends to itself only and the
    queries see the context layers as a sum."""

    name = "interlayer"
    context_windows: tuple[int, ...] = ()
    training_defaults: ClassVar[dict] = {"lr": 5e-4, "batch_size": 512}

    def __init__(
        self,
        *,
        horizons: int = 3,
        context_layers: int = 3,
        d_model: int = 256,
        heads: int = 8,
        ff: int = 1024,
        depth: int = 4,
        memory_slots: int = 64,
        neighbour_tokens: int = 0,
        dropout: float = 0.1,
        focal_gamma: float = 0.0,
        permute_experts: bool = False,
        layer_dropout: float = 0.0,
        subsample: float = 1.0,
        mixup: float = 0.0,
        embedding_noise: float = 0.0,
        cross_layer_attention: bool = True,
        **training,
    ):
        super().__init__(horizons=horizons, focal_gamma=focal_gamma, **(self.training_defaults | training))
        self.context_layers = context_layers
        self.d_model, self.heads, self.ff, self.depth = d_model, heads, ff, depth
        self.memory_slots, self.neighbour_tokens, self.dropout = memory_slots, neighbour_tokens, dropout
        self.permute_experts, self.layer_dropout, self.subsample = permute_experts, layer_dropout, subsample
        self.mixup, self.embedding_noise = mixup, embedding_noise
        self.cross_layer_attention = cross_layer_attention

    @property
    def previous_tokens(self) -> int:  # type: ignore[override]
        return self.neighbour_tokens

    def windows(self) -> tuple[int, ...]:
        return (self.context_layers,)

    def build_module(self, num_layers, num_experts, top_k):
        return InterLayerModule(
            num_layers=num_layers,
            num_experts=num_experts,
            horizons=self.horizons,
            context_windows=self.windows(),
            d_model=self.d_model,
            heads=self.heads,
            ff=self.ff,
            depth=self.depth,
            memory_slots=self.memory_slots,
            neighbour_tokens=self.neighbour_tokens,
            dropout=self.dropout,
            embedding_noise=self.embedding_noise,
            layer_dropout=self.layer_dropout,
            cross_layer_attention=self.cross_layer_attention,
        )

    def loss(self, batch, layer):
        if self.subsample < 1.0:
            keep = torch.rand(len(batch)) < self.subsample
            batch = replace(
                batch,
                expert_ids=batch.expert_ids[keep],
                gate_weights=batch.gate_weights[keep],
                token_ids=batch.token_ids[keep],
                prev_expert_ids=batch.prev_expert_ids[keep],
                hidden=None if batch.hidden is None else batch.hidden[keep],
                doc_ids=batch.doc_ids[keep.numpy()],
                windows=None,
                positions=None,
            )
        if self.permute_experts:  # one relabelling of expert ids, applied to inputs and targets alike
            perm = torch.randperm(batch.num_experts)
            relabel = lambda ids: torch.where(ids >= 0, perm[ids.clamp_min(0)], ids)
            batch = replace(batch, expert_ids=relabel(batch.expert_ids), prev_expert_ids=relabel(batch.prev_expert_ids))
        context, targets = batch.context(layer), batch.targets(layer, self.horizons)
        if self.mixup > 0:
            lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
            perm = torch.randperm(len(batch))
            logits, confidence = self.module_(context, mix=(perm, lam))
            return lam * predictor_loss(logits, confidence, targets, focal_gamma=self.focal_gamma) + (
                1 - lam
            ) * predictor_loss(logits, confidence, targets[perm], focal_gamma=self.focal_gamma)
        logits, confidence = self.module_(context)
        return predictor_loss(logits, confidence, targets, focal_gamma=self.focal_gamma)


class MultiScalePredictor(InterLayerPredictor):
    """Parallel branches over 2, 3 and 4 previous layers, fused with learned scale weights."""

    name = "multiscale"

    def windows(self) -> tuple[int, ...]:
        return (2, 3, 4)


SEED_PRESETS = {
    "baseline": dict(d_model=256, heads=8, ff=1024, depth=4),
    "enhanced": dict(d_model=512, heads=16, ff=2048, depth=6),
    "improved": dict(d_model=320, heads=10, ff=1280, depth=5),
    "small": dict(d_model=128, heads=4, ff=512, depth=2, memory_slots=32),
}
