"""Which experts to prefetch after a layer's routing, from a predictor, at decoding speed.

Decoding asks the same few questions again and again: a transition predictor's answer
depends only on the layer and the expert just routed, a token table's on the token. So the
planner memoises whole answers (the chosen (layer, expert) keys) on the predictor's
``decode_key``, and a repeated question costs a dictionary lookup instead of a prediction
and a top-k. Answers are exact, not approximations: equal keys mean equal predictions.
Predictors without a key are asked every time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from specmoe.offload.tiers import Key
from specmoe.predictors.data import Context


def prefetch_keys(probs: torch.Tensor, targets: range, budget: int, threshold: float = 0.0) -> list[Key]:
    """The (layer, expert) pairs worth prefetching, from per-token probabilities (N, H, E)
    whose horizon h predicts layer ``targets[h]``: per layer, the ``budget`` experts with the
    most expected uses across the batch, most first, skipping any that no token gives at
    least ``threshold``. One sort over all horizons, as decoding asks at every layer; in
    numpy, whose per-call cost at these sizes is a fraction of torch's."""
    horizons = len(targets)
    probs = probs.detach().float().cpu().numpy()[:, :horizons]
    pooled = probs[0] if len(probs) == 1 else probs.sum(0)  # (H, E) expected uses
    top = np.argsort(-pooled, axis=-1, kind="stable")[:, :budget]  # (H, budget), ties to the lower id
    if threshold > 0:
        best = pooled if len(probs) == 1 else probs.max(0)
        keep = np.take_along_axis(best, top, axis=-1) >= threshold
        return [
            (target, e)
            for target, row, oks in zip(targets, top.tolist(), keep.tolist())
            for e, ok in zip(row, oks)
            if ok
        ]
    return [(target, e) for target, row in zip(targets, top.tolist()) for e in row]


@dataclass
class PrefetchPlanner:
    """Prefetch layers l+1..l+``lookahead`` of a stack of ``num_layers`` MoE layers with
    ``num_experts`` experts each, at most ``budget`` experts per layer, each with probability
    >= ``threshold``. At most ``max_entries`` answers are kept (the memo starts over when
    full: keys carrying continuous gate weights rarely repeat, and memory must not grow with
    the output)."""

    predictor: object
    num_layers: int
    num_experts: int
    lookahead: int = 1
    budget: int = 2
    threshold: float = 0.0
    max_entries: int = 65536
    hits: int = 0
    misses: int = 0
    _memo: dict = field(default_factory=dict, repr=False)

    def plan(
        self,
        layer: int,
        expert_ids: np.ndarray,
        gate_weights: np.ndarray,
        token_ids: np.ndarray,
        offset: int = 0,
        hidden: torch.Tensor | None = None,
    ) -> list[Key]:
        """Keys to prefetch once ``layer`` (counted in the stack; ``offset`` turns it into a
        global layer number) has routed N tokens: their experts (N, layer+1, k) and gate
        weights so far, and their token ids (N,), in numpy; for a predictor that reads hidden
        states, those of layers <= ``layer`` (N, layer+1, D). A repeated question touches no
        torch op: on a decoding loop's hot path each one costs microseconds."""
        targets = range(layer + 1, min(layer + 1 + self.lookahead, self.num_layers))
        if not targets:
            return []
        key = self.predictor.decode_key(layer, expert_ids, gate_weights, token_ids)
        key = None if key is None else (layer, key)
        keys = None if key is None else self._memo.get(key)
        if keys is None:
            self.misses += 1
            context = Context.from_routing(
                layer,
                torch.from_numpy(expert_ids),
                torch.from_numpy(gate_weights),
                torch.from_numpy(token_ids),
                self.num_layers,
                self.num_experts,
                hidden,
            )
            keys = prefetch_keys(self.predictor.predict_proba(context), targets, self.budget, self.threshold)
            if key is not None:
                if len(self._memo) >= self.max_entries:
                    self._memo.clear()
                self._memo[key] = keys
        else:
            self.hits += 1
        return [(target + offset, e) for target, e in keys] if offset else list(keys)

    def stats(self) -> dict:
        asked = self.hits + self.misses
        return {"plans": asked, "plan_memo_hit_rate": self.hits / asked if asked else None}
