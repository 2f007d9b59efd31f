"""Prefetch the next token's first layers before the token exists, by guessing it early.

A routing predictor sees token t's layers and predicts t's later ones; when t's last layer
runs, nothing it knows names token t+1's first experts, and a read started then arrives
late. In greedy decoding token t+1 is the argmax of t's final logits, and the residual
stream a few layers before the end, put through the final norm and the unembedding (the
"logit lens"), already names that argmax most of the time; a token table then says which
experts that token routes to in its first layers. Decoder-only models only: an encoder
knows all its input tokens up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from specmoe.errors import InputError
from specmoe.models.lens import LogitLens
from specmoe.offload.forecast import Row
from specmoe.offload.policy import PrefetchSettings, rows_for
from specmoe.offload.settings import NextTokenSettings
from specmoe.predictors.calibration import Calibration

__all__ = ["LogitLens", "NextTokenPlanner"]


@dataclass
class NextTokenPlanner:
    """Once layer ``settings.layer`` of token t has run, guess t+1 from its residual
    output and prefetch, for layers 0..``depth``-1 of t+1, what ``prefetch`` (resolved)
    allows per layer of the experts the guessed tokens route to most (weighted by the
    guesses' probabilities). ``table`` is a fitted token table (anything with
    ``expected_rows(ids, probs, layers) -> (N, layers, E)``). Targets stop at the guess layer: a layer-keyed
    prefetch of a later layer would be taken by token t's own pass."""

    lens: LogitLens
    table: object
    settings: NextTokenSettings
    num_layers: int
    prefetch: PrefetchSettings
    calibration: Calibration | None = None
    """The table's: its horizon-1 map turns a looked-up row into probabilities (the guess
    itself taken as right as its renormalised probability says)."""

    def __post_init__(self):
        s = self.settings
        if not s.layer < self.num_layers:
            raise InputError(f"--next-token-layer must be in [0, {self.num_layers}), got {s.layer}")
        if s.depth > s.layer + 1:
            raise InputError(
                f"--next-token-depth {s.depth} reaches past the guess layer {s.layer}: a guess "
                f"made after layer {s.layer} can key layers 0..{s.layer} of the next token"
            )
        if not hasattr(self.table, "expected_rows"):
            raise InputError(
                f"next-token prefetch looks experts up by token: it needs a token table predictor, "
                f"got {getattr(self.table, 'name', type(self.table).__name__)!r}"
            )

    @property
    def guess_layer(self) -> int:
        return self.settings.layer

    def guess(self, residual: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The guessed next tokens of the N sequences whose residuals (N, D) are given, and
        their weights, both (N, candidates). Meant for the decoding thread: the lens is one
        matrix product, and on the prefetch thread its torch call slowed the layers computing
        beside it by more than the prefetch saved (``docs/benchmarks.md``, "Top-2 routing in
        a decoder")."""
        return self.lens.guess(residual, self.settings.candidates)

    def plan(self, ids: np.ndarray, probs: np.ndarray, *, by_value: bool = False) -> list[Row]:
        """The forecast's rows for the guessed tokens (from :meth:`guess`), pooled over the
        batch like any plan: by the fixed budget, or (``by_value``) the candidates a value
        rule weighs. A table lookup, cheap enough for the prefetch thread."""
        targets = range(self.settings.depth)
        expected = self.table.expected_rows(ids, probs, len(targets))  # (N, targets, E)
        calibrated = expected if self.calibration is None else self.calibration.apply(expected, [1] * len(targets))
        return rows_for(expected, calibrated, list(targets), self.prefetch, by_value=by_value)
