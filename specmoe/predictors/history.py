"""Activation-history matching (MoE-Infinity's expert activation matrices).

A sequence's experts repeat: what it routed to so far says which experts its later layers
will use. The predictor keeps, from the training split, the activation matrix of sampled
windows (for each layer, how often each expert was used, as a distribution); at decode
time it builds the current sequence's matrix from its earlier tokens and the current token's
layers so far, finds the recorded matrices most like it (cosine similarity), and predicts
each later layer by their rows, weighted by similarity. It sees the current token only
through the routing of its layers <= l: a sequence-level prior, not a token-level guess.
"""

from __future__ import annotations

import numpy as np
import torch

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset


def _activation(expert_ids: np.ndarray, num_layers: int, num_experts: int) -> np.ndarray:
    """(N, T, L', k) expert ids (negative: none) -> (N, L, E) counts over the T tokens."""
    n, _, layers, _ = expert_ids.shape
    counts = np.zeros((n, num_layers, num_experts + 1), dtype=np.float32)
    ids = np.where(expert_ids >= 0, expert_ids, num_experts)
    rows = np.broadcast_to(np.arange(n)[:, None, None, None], ids.shape)
    cols = np.broadcast_to(np.arange(layers)[None, None, :, None], ids.shape)
    np.add.at(counts, (rows, cols, ids), 1.0)
    return counts[..., :num_experts]


class ActivationHistoryPredictor(ExpertPredictor):
    """Predicts layers l+1..l+H from the sequence's activation history matched against
    ``library_size`` recorded windows' (the ``neighbours`` most similar, by cosine over the
    layers seen), reading up to ``window`` earlier tokens."""

    name = "history"

    def __init__(self, *, horizons: int = 7, window: int = 32, library_size: int = 512, neighbours: int = 16):
        super().__init__(horizons=horizons)
        self.window = window
        self.library_size = library_size
        self.neighbours = neighbours

    @property
    def previous_tokens(self) -> int:  # type: ignore[override]
        return self.window

    def fit(self, train: TraceDataset, val: TraceDataset | None = None) -> ActivationHistoryPredictor:
        layers, experts = train.num_layers, train.num_experts
        matrices: dict[int, np.ndarray] = {}
        for batch in train.iter_batches(8192):
            ids = batch.expert_ids.numpy()[:, None]  # (N, 1, L, k)
            per_token = _activation(ids, layers, experts)  # (N, L, E)
            for window in np.unique(batch.windows):
                rows = batch.windows == window
                total = per_token[rows].sum(0)
                matrices[int(window)] = matrices.get(int(window), 0) + total
        keys = sorted(matrices)
        if not keys:
            raise ValueError("no training tokens to build an activation history from")
        chosen = np.linspace(0, len(keys) - 1, min(self.library_size, len(keys))).round().astype(int)
        library = np.stack([matrices[keys[i]] for i in np.unique(chosen)])  # (M, L, E)
        self.library_ = library / np.maximum(library.sum(-1, keepdims=True), 1e-9)
        self.num_layers_, self.num_experts_ = layers, experts
        return self

    def predict_proba(self, context: Context) -> torch.Tensor:
        layers, experts, layer = self.num_layers_, self.num_experts_, context.layer
        earlier = context.prev_expert_ids.numpy()[:, : self.window]  # (N, P, L, k)
        current = context.expert_ids.numpy()[:, None]  # (N, 1, l+1, k)
        seen = _activation(earlier, layers, experts) + _activation(current, layers, experts)
        seen = seen / np.maximum(seen.sum(-1, keepdims=True), 1e-9)
        flat = seen.reshape(len(seen), -1)
        library = self.library_.reshape(len(self.library_), -1)
        similarity = (
            flat @ library.T / (np.linalg.norm(flat, axis=1, keepdims=True) * np.linalg.norm(library, axis=1) + 1e-9)
        )  # (N, M)
        count = min(self.neighbours, len(library))
        nearest = np.argpartition(-similarity, count - 1, axis=1)[:, :count]
        weight = np.maximum(np.take_along_axis(similarity, nearest, 1), 1e-6)
        weight /= weight.sum(1, keepdims=True)
        out = np.zeros((len(seen), self.horizons, experts), dtype=np.float32)
        for h in range(self.horizons):
            if layer + 1 + h < layers:
                out[:, h] = np.einsum("nm,nme->ne", weight, self.library_[nearest, layer + 1 + h])
        return torch.from_numpy(out)

    def fitted_meta(self) -> dict:
        if not hasattr(self, "library_"):
            return {}
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"library": torch.from_numpy(np.ascontiguousarray(self.library_, dtype=np.float32))}

    def load_state_tensors(self, tensors, meta) -> None:
        self.library_ = tensors["library"].numpy()
        self.num_layers_, self.num_experts_ = meta["num_layers"], meta["num_experts"]
