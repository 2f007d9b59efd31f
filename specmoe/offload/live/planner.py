"""What a predictor forecasts after a layer's routing, at decoding speed.

Decoding asks the same few questions again and again: a transition predictor's answer
depends only on the layer and the expert just routed, a token table's on the token. So the
planner memoises whole answers (the forecast's rows: target layers, experts, calibrated
probabilities) on the predictor's ``decode_key``, and a repeated question costs a
dictionary lookup instead of a prediction and a top-k. Answers are exact, not
approximations: equal keys mean equal predictions. Predictors without a key are asked every
time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from specmoe.offload.forecast import Row
from specmoe.offload.policy import POLICIES, Policy, PrefetchSettings, plan_rows
from specmoe.predictors.calibration import Calibration
from specmoe.predictors.data import Context


@dataclass
class PrefetchPlanner:
    """Forecasts for a stack of ``num_layers`` MoE layers with ``num_experts`` experts each, as
    ``settings`` (resolved) and the policy's ``rule`` say, with probabilities the
    ``calibration`` maps the predictor's scores to (none: the scores). At most
    ``max_entries`` answers are kept (the memo starts over when full: keys carrying
    continuous gate weights rarely repeat, and memory must not grow with the output)."""

    predictor: object
    num_layers: int
    num_experts: int
    settings: PrefetchSettings
    rule: Policy = POLICIES["prefetch"]
    calibration: Calibration | None = None
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
        previous: np.ndarray | None = None,
    ) -> list[Row]:
        """The forecast's rows once ``layer`` (counted in the stack; ``offset`` turns it into a
        global layer number) has routed N tokens: their experts (N, layer+1, k) and gate
        weights so far, and their token ids (N,), in numpy; for a predictor that reads hidden
        states, those of layers <= ``layer`` (N, layer+1, D); for one that reads earlier tokens,
        their routing (N, P, L, k), the most recent first. A repeated question touches no
        torch op: on a decoding loop's hot path each one costs microseconds."""
        if layer + 1 >= self.num_layers:
            return []
        key = self.predictor.decode_key(layer, expert_ids, gate_weights, token_ids)
        key = None if key is None else (layer, key)
        rows = None if key is None else self._memo.get(key)
        if rows is None:
            self.misses += 1
            context = Context.from_routing(
                layer,
                torch.from_numpy(expert_ids),
                torch.from_numpy(gate_weights),
                torch.from_numpy(token_ids),
                self.num_layers,
                self.num_experts,
                hidden,
                None if previous is None else torch.from_numpy(previous),
            )
            calibrate = None if self.calibration is None else self.calibration.apply
            rows = plan_rows(
                self.predictor.predict_proba(context), layer, self.num_layers, self.settings, self.rule, calibrate
            )
            if key is not None:
                if len(self._memo) >= self.max_entries:
                    self._memo.clear()
                self._memo[key] = rows
        else:
            self.hits += 1
        return [(target + offset, listed, bound) for target, listed, bound in rows] if offset else list(rows)

    def stats(self) -> dict:
        asked = self.hits + self.misses
        return {"plans": asked, "plan_memo_hit_rate": self.hits / asked if asked else None}
