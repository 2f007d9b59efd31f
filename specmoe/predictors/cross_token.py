"""Predicting across the token boundary: token t+1's first layers from what is known once
token t's last layers have run.

Within a token, routing predictors see layers 0..l and score l+1..l+H. Layer 0 of the next
token is the read that waits longest, and nothing of that token exists yet: not its id,
not its routing. What exists is token t's residual stream (and through the model's final
norm and unembedding, the "logit lens", a guess of the next token), token t's own routing,
and tables fitted on traces. A cross-token predictor is asked after one of token t's last
``reach`` layers (``context.layer``) and scores token t+1's layers 0..``depth``-1 (fewer if
the model has fewer); the
Context it receives is token t's, so nothing of token t+1 can leak into it. Scored by
:func:`specmoe.predictors.metrics.evaluate_next_token` with the in-token metrics, at the
"horizon" L - l + j from token t's layer l to token t+1's layer j.
"""

from __future__ import annotations

import numpy as np
import torch

from specmoe.errors import InputError
from specmoe.models.lens import LogitLens
from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.counting import TokenTablePredictor
from specmoe.predictors.data import Context, TraceDataset


class CrossTokenMixin:
    """What every cross-token predictor shares: its reach, its depth, and its score."""

    depth: int
    reach: int
    num_layers_: int

    def get_params(self) -> dict:
        params = super().get_params()  # type: ignore[misc]
        params.pop("horizons", None)  # the depth is the horizon count here
        return params

    def source_layers(self) -> range:
        """Token t's layers after which it is asked: the last ``reach``."""
        return range(max(self.num_layers_ - self.reach, 0), self.num_layers_)

    def predict_next(self, context: Context) -> torch.Tensor:
        """Scores (N, depth, E) for the next token's layers 0..depth-1, after ``context.layer``
        of the current token (one of :meth:`source_layers`)."""
        raise NotImplementedError

    def predict_proba(self, context: Context) -> torch.Tensor:
        raise InputError(f"{self.name} predicts the next token's layers: ask predict_next, not predict_proba")

    def score(self, data: TraceDataset) -> float:
        """Mean recall@k over the next token's layers, asked after the last layer."""
        from specmoe.predictors.metrics import evaluate_next_token

        rows = evaluate_next_token(self, data, bootstrap=0, source_layers=[self.num_layers_ - 1])
        return float(np.mean([r["recall_at_k"] for r in rows if r["layer"] != "all"]))

    def check_source(self, context: Context) -> None:
        if context.layer not in self.source_layers():
            raise InputError(
                f"{self.name} is asked after layers {self.source_layers().start}..{self.num_layers_ - 1} "
                f"(reach {self.reach}), not after layer {context.layer}"
            )
        if context.hidden is None:
            raise InputError(f"{self.name} needs residual_out states: collect with --save-residuals")


def check_shape(predictor, train: TraceDataset) -> None:
    if min(predictor.depth, predictor.reach, getattr(predictor, "candidates", 1)) < 1:
        raise InputError("depth, reach and candidates must be positive")


def fit_lens(model_id: str) -> LogitLens:
    """The logit lens of ``model_id`` rebuilt from tensors (what a saved predictor holds); the
    routed experts are not loaded, so this works for models larger than memory."""
    from specmoe.models.offloaded import load_offloaded

    model = load_offloaded(model_id, dtype="float32", progress=False).loaded.model
    return LogitLens.from_tensors(LogitLens.of(model).tensors())


class NextTokenTablePredictor(CrossTokenMixin, ExpertPredictor):
    """Today's next-token prefetch as a predictor: guess the next token with the logit lens on
    the residual stream, and read its first layers from a token table (the ``candidates``
    likeliest tokens, mixed by the lens's probabilities renormalised over them)."""

    name = "next-token-table"
    needs_hidden = "residual_out"

    def __init__(self, *, depth: int = 3, reach: int = 3, candidates: int = 1, model: str | None = None):
        self.depth, self.reach, self.candidates, self.model = depth, reach, candidates, model

    @property
    def horizons(self) -> int:
        return self.depth

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        check_shape(self, train)
        self.table_ = TokenTablePredictor(horizons=1).fit(train)
        self.lens_ = fit_lens(self.model or train.store.manifest.model.id)
        self.num_layers_, self.num_experts_ = train.num_layers, train.num_experts
        return self

    def guess(self, context: Context) -> tuple[np.ndarray, np.ndarray]:
        """The lens's ``candidates`` guesses of the next token, and their weights, (N, C)."""
        self.check_source(context)
        return self.lens_.guess(context.hidden[:, -1], self.candidates)

    def predict_next(self, context: Context) -> torch.Tensor:
        ids, probs = self.guess(context)
        return torch.from_numpy(self.table_.expected_rows(ids, probs, self.depth))

    def fitted_meta(self) -> dict:
        if not hasattr(self, "table_"):
            return {}
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_, "table": self.table_.fitted_meta()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        table = {f"table.{k}": v for k, v in self.table_.state_tensors().items()}
        return {**table, **self.lens_.tensors()}

    def load_state_tensors(self, tensors, meta) -> None:
        self.num_layers_, self.num_experts_ = meta["num_layers"], meta["num_experts"]
        self.table_ = TokenTablePredictor(horizons=1)
        self.table_.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("table.")}, meta["table"])
        self.lens_ = LogitLens.from_tensors(tensors)

    def num_parameters(self) -> int:
        return self.table_.num_parameters() if hasattr(self, "table_") else 0  # the lens is the model's own
