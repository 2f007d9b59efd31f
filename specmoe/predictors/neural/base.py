"""Predictors that are torch modules, trained by :mod:`specmoe.training.loop`."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import IGNORE, Context, RoutingBatch, TraceDataset


class PredictorModule(nn.Module):
    """``forward(context) -> (logits (N, H, E), confidence_logit (N, H))``."""

    def forward(self, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def soft_targets(targets: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, k) ids -> (N, H, E) uniform distribution over each token's true experts, and
    the (N, H) mask of rows that have any."""
    valid = targets >= 0
    dist = torch.zeros(*targets.shape[:2], num_experts)
    dist.scatter_add_(2, targets.clamp_min(0), valid.float())
    mass = dist.sum(-1, keepdim=True)
    return dist / mass.clamp_min(1), mass[..., 0] > 0


def predictor_loss(
    logits: torch.Tensor,
    confidence: torch.Tensor,
    targets: torch.Tensor,
    *,
    focal_gamma: float = 0.0,
    confidence_weight: float = 0.1,
) -> torch.Tensor:
    """Soft-label cross-entropy (focal when ``focal_gamma`` > 0) on the expert head, plus
    binary cross-entropy teaching the confidence head whether the top guess is a true expert."""
    dist, rows = soft_targets(targets, logits.shape[-1])
    if not rows.any():
        return logits.sum() * 0.0
    log_p = torch.log_softmax(logits.float(), dim=-1)
    per_class = -dist * log_p
    if focal_gamma > 0:
        per_class = per_class * (1 - log_p.exp()) ** focal_gamma
    ce = per_class.sum(-1)[rows].mean()
    hit = (targets == logits.argmax(-1, keepdim=True)).any(-1).float()
    bce = nn.functional.binary_cross_entropy_with_logits(confidence.float()[rows], hit[rows])
    return ce + confidence_weight * bce


def ranking_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp pairwise ranking loss (LSEP, Li et al. 2017) of scores (N, H, E) against
    the true (N, H, k) ids: ``log(1 + sum over true i, other j of exp(s_j - s_i))``, a smooth
    bound on the number of (true, other) pairs ranked the wrong way; none is recall@k = 1. It
    leaves the true experts' order among themselves free, as recall@k does (for k = 1 it is
    the cross-entropy)."""
    positive = torch.zeros(logits.shape).scatter_add_(2, targets.clamp_min(0), (targets >= 0).float()) > 0
    rows = positive.any(-1)
    if not rows.any():
        return logits.sum() * 0.0
    scores = logits.float()
    others = torch.logsumexp(scores.masked_fill(positive, float("-inf")), -1)
    true = torch.logsumexp((-scores).masked_fill(~positive, float("-inf")), -1)
    return nn.functional.softplus(others + true)[rows].mean()


class TorchPredictor(ExpertPredictor):
    """An :class:`ExpertPredictor` whose state is an ``nn.Module`` (``module_``).

    Subclasses implement :meth:`build_module`; training settings are constructor arguments
    so they are saved with the predictor and a rerun reproduces it. A subclass takes them as
    ``**training`` and states only the defaults it changes in ``training_defaults``.
    """

    training_defaults: ClassVar[dict] = {}
    fits_cpu: ClassVar[bool] = False
    """Its own settings train to convergence on 2 CPU cores in minutes, so a CPU budget
    (``bench predictors --budget cpu``) leaves them as they are."""

    def __init__(
        self,
        *,
        horizons: int = 3,
        epochs: int = 10,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        batch_size: int = 1024,
        warmup_fraction: float = 0.05,
        grad_clip: float = 1.0,
        patience: int = 3,
        max_steps_per_epoch: int | None = None,
        focal_gamma: float = 0.0,
        seed: int = 0,
    ):
        self.horizons = horizons
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.warmup_fraction = warmup_fraction
        self.grad_clip = grad_clip
        self.patience = patience
        self.max_steps_per_epoch = max_steps_per_epoch
        self.focal_gamma = focal_gamma
        self.seed = seed

    def build_module(self, num_layers: int, num_experts: int, top_k: int) -> PredictorModule:
        raise NotImplementedError

    def init_module(self, num_layers: int, num_experts: int, top_k: int) -> None:
        torch.manual_seed(self.seed)
        self.num_layers_, self.num_experts_, self.top_k_ = num_layers, num_experts, top_k
        self.module_ = self.build_module(num_layers, num_experts, top_k)

    def source_layers(self) -> range:
        """The layers after which this predictor is asked (each training step averages its
        loss over them): every layer that has a next one."""
        return range(self.num_layers_ - 1)

    def loss(self, batch: RoutingBatch, layer: int) -> torch.Tensor:
        context = batch.context(layer)
        logits, confidence = self.module_(context)
        return predictor_loss(logits, confidence, batch.targets(layer, self.horizons), focal_gamma=self.focal_gamma)

    def fit(
        self,
        train: TraceDataset,
        val: TraceDataset | None = None,
        *,
        out_dir=None,
        resume: bool = False,
        progress: bool = True,
    ):
        from specmoe.training.loop import train_predictor

        return train_predictor(self, train, val, out_dir=out_dir, resume=resume, progress=progress)

    def predict_proba(self, context: Context) -> torch.Tensor:
        self.check_fitted()
        self.module_.eval()
        with torch.no_grad():
            logits, _ = self.module_(context)
        return torch.softmax(logits.float(), dim=-1)

    def predict_confidence(self, context: Context) -> torch.Tensor:
        """(N, H) probability that the top guess is among the true experts."""
        self.module_.eval()
        with torch.no_grad():
            return torch.sigmoid(self.module_(context)[1].float())

    def fitted_meta(self) -> dict:
        if not hasattr(self, "module_"):
            return {}
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_, "top_k": self.top_k_}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.module_.state_dict())

    def load_state_tensors(self, tensors, meta) -> None:
        self.init_module(meta["num_layers"], meta["num_experts"], meta["top_k"])
        self.module_.load_state_dict(tensors)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module_.parameters()) if hasattr(self, "module_") else 0


def embed_routing(embedding: nn.Embedding, ids: torch.Tensor, weights: torch.Tensor, pad_index: int) -> torch.Tensor:
    """Gate-weighted sum of expert embeddings: (..., k) ids -> (..., d). Dropped (-1) and
    padding (IGNORE) slots map to the ``pad_index`` row with their weight kept at 1/k."""
    missing = ids < 0
    ids = torch.where(missing, torch.full_like(ids, pad_index), ids)
    weights = torch.where(missing, torch.full_like(weights, 1.0 / ids.shape[-1]), weights.float())
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    return (embedding(ids) * weights[..., None]).sum(-2)


__all__ = [
    "IGNORE",
    "PredictorModule",
    "TorchPredictor",
    "embed_routing",
    "predictor_loss",
    "ranking_loss",
    "soft_targets",
]
