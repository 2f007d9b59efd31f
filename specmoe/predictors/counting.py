"""Counting baselines: fit in one pass over the traces, no epochs.

All return normalised distributions over experts, smoothed towards the target layer's
popularity so an unseen context still gets a sensible guess. Fitting counts with torch;
predicting is done in numpy on tables derived once, because decoding asks for one token at
a time and numpy's per-operation overhead is a fraction of torch's.
"""

from __future__ import annotations

import numpy as np
import torch

from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset
from specmoe.predictors.tables import SparseCounts


def _normalise(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)


def _current_routing_key(expert_ids: np.ndarray, gate_weights: np.ndarray) -> tuple[bytes, bytes]:
    """The current layer's experts and, past top-1 (where every normalised weight is 1), their
    gate weights: what the transition mix reads."""
    ids = np.ascontiguousarray(expert_ids[:, -1])
    if ids.shape[1] == 1:
        return ids.tobytes(), b""
    return ids.tobytes(), np.ascontiguousarray(gate_weights[:, -1], dtype=np.float32).tobytes()


class _CountingPredictor(ExpertPredictor):
    """Shared fitting loop and popularity prior."""

    def __init__(self, *, horizons: int = 3, smoothing: float = 1.0):
        self.horizons = horizons
        self.smoothing = smoothing

    def _start(self, train: TraceDataset) -> None:
        self.num_layers_, self.num_experts_, self.top_k_ = train.num_layers, train.num_experts, train.top_k
        self.popularity_ = torch.zeros(self.num_layers_, self.num_experts_)
        self._memo = {}

    def _derived(self, name: str, layer: int, build):
        """A table derived from the fitted counts, built on first use: decoding asks for the
        same layers every token, and rebuilding them each time cost more than the lookup."""
        memo = self.__dict__.setdefault("_memo", {})
        if (name, layer) not in memo:
            memo[name, layer] = build(layer)
        return memo[name, layer]

    def _accumulate(self, batch, layer: int, context: Context, targets: torch.Tensor) -> None:
        """Count one (layer, batch): ``targets`` is (N, H, k), IGNORE where undefined."""

    @staticmethod
    def _target_weights(batch, layer: int, horizons: int) -> torch.Tensor:
        """(N, H, k) gate weights of the target experts, normalised per token: a count adds
        more for the expert the router trusted most, so the top-1 is learned as such."""
        out = torch.zeros(len(batch), horizons, batch.expert_ids.shape[2])
        for h in range(1, horizons + 1):
            if layer + h < batch.num_layers:
                w = torch.where(batch.expert_ids[:, layer + h] >= 0, batch.gate_weights[:, layer + h].float(), 0.0)
                out[:, h - 1] = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        return out

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        self._start(train)
        for batch in train.iter_batches():
            for layer in range(self.num_layers_):
                ids = batch.expert_ids[:, layer].reshape(-1)
                self.popularity_[layer] += torch.bincount(ids[ids >= 0], minlength=self.num_experts_).float()
            for layer in range(self.num_layers_ - 1):
                self._accumulate(batch, layer, batch.context(layer), batch.targets(layer, self.horizons))
        self._finish()
        self._memo = {}
        return self

    def _finish(self) -> None:
        pass

    def _prior(self, layer: int) -> np.ndarray:
        """(H, E) popularity of layers layer+1..layer+H (uniform past the last layer)."""
        return self._derived("prior", layer, self._build_prior)

    def _layer_popularity(self) -> np.ndarray:
        """(L, E): each layer's smoothed expert popularity."""
        return self._derived("popularity", None, lambda _: _normalise(self.popularity_ + 1e-3).numpy())

    def _build_prior(self, layer: int) -> np.ndarray:
        popularity = self._layer_popularity()
        uniform = np.full(self.num_experts_, 1 / self.num_experts_, dtype=np.float32)
        rows = [popularity[layer + h] if layer + h < self.num_layers_ else uniform for h in range(1, self.horizons + 1)]
        return np.stack(rows)

    def _prior_for(self, context: Context) -> np.ndarray:
        """(N, H, E) the prior for every token of ``context`` (a copy, free to overwrite)."""
        prior = self._prior(context.layer)
        return np.broadcast_to(prior, (len(context), *prior.shape)).copy()

    def fitted_meta(self) -> dict:
        if not hasattr(self, "num_layers_"):
            return {}
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_, "top_k": self.top_k_}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"popularity": self.popularity_}

    def load_state_tensors(self, tensors, meta) -> None:
        self.num_layers_, self.num_experts_, self.top_k_ = meta["num_layers"], meta["num_experts"], meta["top_k"]
        self.popularity_ = tensors["popularity"]
        self._memo = {}


class PopularityPredictor(_CountingPredictor):
    """How often each expert is used at the target layer, whatever the token."""

    name = "popularity"

    def decode_key(self, layer, expert_ids, gate_weights, token_ids):
        return len(expert_ids)

    def predict_proba(self, context: Context) -> torch.Tensor:
        return torch.from_numpy(self._prior_for(context))


class TransitionPredictor(_CountingPredictor):
    """P(expert at layer l+h | experts at layer l), mixed over the k experts of layer l by
    their gate weights."""

    name = "transition"

    def _start(self, train):
        super()._start(train)
        e = self.num_experts_
        self.transitions_ = torch.zeros(self.num_layers_, self.horizons, e, e)

    def _accumulate(self, batch, layer, context, targets):
        e = self.num_experts_
        src = context.expert_ids[:, layer]  # (N, k)
        src_w = torch.where(src >= 0, context.gate_weights[:, layer].float(), 0.0)
        src_w = src_w / src_w.sum(-1, keepdim=True).clamp_min(1e-12)
        dst_w = self._target_weights(batch, layer, targets.shape[1])
        for h in range(targets.shape[1]):
            dst = targets[:, h]  # (N, k)
            pairs_src = src[:, :, None].expand(-1, -1, dst.shape[1]).reshape(-1)
            pairs_dst = dst[:, None, :].expand(-1, src.shape[1], -1).reshape(-1)
            mass = (src_w[:, :, None] * dst_w[:, h, None, :]).reshape(-1)
            ok = (pairs_src >= 0) & (pairs_dst >= 0)
            self.transitions_[layer, h] += (
                torch.bincount(pairs_src[ok] * e + pairs_dst[ok], weights=mass[ok], minlength=e * e).view(e, e).float()
            )

    def _conditional(self, layer: int) -> np.ndarray:
        """(H, E, E): P(expert at layer+h | expert at layer), smoothed towards the prior."""
        prior, table = self._prior(layer), self.transitions_[layer].numpy()
        return (table + self.smoothing * prior[:, None, :]) / (table.sum(-1, keepdims=True) + self.smoothing)

    def _mixed(self, context: Context) -> np.ndarray:
        """(N, H, E): the conditionals of the current layer's experts, mixed by gate weight."""
        conditional = self._derived("conditional", context.layer, self._conditional)  # (H, E, E)
        src = context.expert_ids[:, -1].numpy()  # (N, k)
        if src.shape[1] == 1 and src.min() >= 0:  # top-1: every normalised gate weight is 1
            return conditional[:, src[:, 0]].transpose(1, 0, 2)
        weights = context.gate_weights[:, -1].float().numpy() * (src >= 0)
        total = weights.sum(-1, keepdims=True)
        gathered = conditional[:, np.maximum(src, 0)]  # (H, N, k, E)
        mixed = np.einsum("nk,hnke->nhe", weights / np.maximum(total, 1e-12), gathered)
        if total.min() > 0:  # decoding's usual case: no token without a routed expert
            return mixed
        return np.where((total == 0)[:, :, None], self._prior(context.layer), mixed)

    def predict_proba(self, context: Context) -> torch.Tensor:
        return torch.from_numpy(self._mixed(context))

    def decode_key(self, layer, expert_ids, gate_weights, token_ids):
        return _current_routing_key(expert_ids, gate_weights)

    def state_tensors(self):
        return {**super().state_tensors(), "transitions": self.transitions_}

    def load_state_tensors(self, tensors, meta):
        super().load_state_tensors(tensors, meta)
        self.transitions_ = tensors["transitions"]


class NGramPredictor(_CountingPredictor):
    """P(experts at layer l+h | top-1 experts of layers l-c+1..l): the seed's "last c layers"
    context as a lookup table, backed off to the transition predictor (Dirichlet smoothing)."""

    name = "ngram"

    def __init__(self, *, horizons: int = 3, context_layers: int = 3, smoothing: float = 2.0):
        self.horizons = horizons
        self.context_layers = context_layers
        self.smoothing = smoothing

    def _start(self, train):
        super()._start(train)
        self.table_ = SparseCounts(self.num_experts_)
        self.backoff_ = TransitionPredictor(horizons=self.horizons)
        self.backoff_._start(train)

    def _keys(self, context: Context) -> np.ndarray:
        """(H, N) table keys: the horizon, the layer, then the context code."""
        base = self.num_experts_ + 1
        code = self._context_code(context.layer, context.expert_ids.numpy())
        horizon = context.layer * self.horizons + np.arange(self.horizons, dtype=np.int64)
        return horizon[:, None] * base**self.context_layers + code

    def _context_code(self, layer: int, expert_ids: np.ndarray) -> np.ndarray:
        """(N,) the top-1 experts of the last ``context_layers`` layers up to ``layer``, as
        digits in base E+1 (E stands for none / before layer 0)."""
        base = self.num_experts_ + 1
        code = np.zeros(len(expert_ids), dtype=np.int64)
        for back in range(self.context_layers - 1, -1, -1):
            column = expert_ids[:, layer - back, 0] if layer >= back else -1
            code = code * base + np.where(column >= 0, column, self.num_experts_)
        return code

    def _accumulate(self, batch, layer, context, targets):
        self.backoff_._accumulate(batch, layer, context, targets)
        weights = self._target_weights(batch, layer, targets.shape[1]).numpy()
        keys = self._keys(context)
        for h in range(targets.shape[1]):
            for slot in range(targets.shape[2]):
                self.table_.add(keys[h], targets[:, h, slot].numpy(), weights[:, h, slot])

    def _finish(self):
        self.backoff_.popularity_ = self.popularity_
        self.backoff_._memo = {}
        self.table_.freeze()

    def decode_key(self, layer, expert_ids, gate_weights, token_ids):
        return self._context_code(layer, expert_ids).tobytes(), _current_routing_key(expert_ids, gate_weights)

    def predict_proba(self, context: Context) -> torch.Tensor:
        backoff = self.backoff_._mixed(context)  # (N, H, E)
        keys = self._keys(context).reshape(-1)  # one lookup for all horizons
        counts = self.table_.lookup(keys).reshape(self.horizons, len(context), -1).transpose(1, 0, 2)
        return torch.from_numpy((counts + self.smoothing * backoff) / (counts.sum(-1, keepdims=True) + self.smoothing))

    def state_tensors(self):
        return {**super().state_tensors(), "transitions": self.backoff_.transitions_, **self.table_.state("ngram")}

    def load_state_tensors(self, tensors, meta):
        super().load_state_tensors(tensors, meta)
        self.backoff_ = TransitionPredictor(horizons=self.horizons)
        self.backoff_.load_state_tensors(tensors, meta)
        self.table_ = SparseCounts.from_state(tensors, "ngram", self.num_experts_)


class TokenTablePredictor(_CountingPredictor):
    """P(expert at layer j | token id): routing that follows the token, not the context."""

    name = "token"

    def _start(self, train):
        super()._start(train)
        self.table_ = SparseCounts(self.num_experts_)

    def _accumulate(self, batch, layer, context, targets):
        if layer == 0:  # each token once per target layer: count layers 0..L-1 here
            tokens = batch.token_ids.numpy() * self.num_layers_
            weights = torch.cat(
                [self._target_weights(batch, -1, 1)[:, 0:1], self._target_weights(batch, 0, self.num_layers_ - 1)], 1
            ).numpy()  # (N, L, k)
            for target_layer in range(self.num_layers_):
                for slot in range(batch.expert_ids.shape[2]):
                    self.table_.add(
                        tokens + target_layer,
                        batch.expert_ids[:, target_layer, slot].numpy(),
                        weights[:, target_layer, slot],
                    )

    def _finish(self):
        self.table_.freeze()
        self._last_rows = None

    def token_rows(self, token_ids: np.ndarray) -> np.ndarray:
        """(N, L, E): every layer's smoothed distribution for these tokens. It does not depend
        on the layer asking, so one lookup serves all the layers of a token (or a batch)."""
        last = getattr(self, "_last_rows", None)
        if last is not None and np.array_equal(last[0], token_ids):
            return last[1]
        layers = self.num_layers_
        keys = (token_ids[:, None] * layers + np.arange(layers)).reshape(-1)
        counts = self.table_.lookup(keys).reshape(len(token_ids), layers, -1)
        prior = self._layer_popularity()
        rows = (counts + self.smoothing * prior) / (counts.sum(-1, keepdims=True) + self.smoothing)
        self._last_rows = (token_ids.copy(), rows)
        return rows

    def expected_rows(self, token_ids: np.ndarray, probs: np.ndarray, layers: int) -> np.ndarray:
        """(N, layers, E): layers 0..layers-1 (at most L) of the N rows of candidate tokens (N, C), mixed
        by their probabilities (N, C): what a guess of the next token says of its routing."""
        n, candidates = token_ids.shape
        rows = self.token_rows(token_ids.reshape(-1))[:, :layers]  # fewer if the model has fewer
        rows = rows.reshape(n, candidates, rows.shape[1], -1)
        return (probs[:, :, None, None] * rows).sum(1)

    def decode_key(self, layer, expert_ids, gate_weights, token_ids):
        return np.ascontiguousarray(token_ids).tobytes()

    def predict_proba(self, context: Context) -> torch.Tensor:
        out = self._prior_for(context)
        targets = range(context.layer + 1, min(context.layer + self.horizons, self.num_layers_ - 1) + 1)
        if targets:
            out[:, : len(targets)] = self.token_rows(context.token_ids.numpy())[:, targets.start : targets.stop]
        return torch.from_numpy(out)

    def state_tensors(self):
        return {**super().state_tensors(), **self.table_.state("token")}

    def load_state_tensors(self, tensors, meta):
        super().load_state_tensors(tensors, meta)
        self.table_ = SparseCounts.from_state(tensors, "token", self.num_experts_)
        self._last_rows = None
