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

from specmoe.offload import Key
from specmoe.offload.policy import PrefetchSettings, choose_prefetches
from specmoe.predictors.data import Context


@dataclass
class PrefetchPlanner:
    """Prefetch for a stack of ``num_layers`` MoE layers with ``num_experts`` experts each, as
    ``settings`` (resolved) say. At most ``max_entries`` answers are kept (the memo starts
    over when full: keys carrying continuous gate weights rarely repeat, and memory must not
    grow with the output)."""

    predictor: object
    num_layers: int
    num_experts: int
    settings: PrefetchSettings
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
        targets = range(layer + 1, min(layer + 1 + self.settings.layers_ahead, self.num_layers))
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
            s = self.settings
            keys = choose_prefetches(
                self.predictor.predict_proba(context), targets, s.experts_per_layer, s.min_probability
            )
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
