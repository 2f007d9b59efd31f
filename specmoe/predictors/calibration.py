"""Calibrated probabilities: how likely an expert a predictor scores is really needed.

A predictor's scores rank experts; weighing a read's benefit against its cost needs more:
the probability that the expert is among the layer's true top-k. Those differ by predictor
(a token table's normalised counts sum to 1 over experts, a router's softmax too, yet k
experts are chosen) and by horizon (farther layers are guessed worse), so they are fitted
per horizon by isotonic regression (pool-adjacent-violators: the best non-decreasing map
from score to frequency) of "in the true top-k" on the score, over the validation split,
and stored as JSON beside the predictor (``calibration.json``), with the Brier score before
and after. A horizon beyond those fitted uses the farthest fitted map.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from specmoe.errors import InputError
from specmoe.predictors.data import TraceDataset

CALIBRATION_FILE = "calibration.json"


def isotonic(x: np.ndarray, y: np.ndarray, bins: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A non-decreasing map fitted to pairs (x, y), as breakpoints for ``np.interp``. The
    points are first pooled into at most ``bins`` groups of neighbouring scores (equal
    scores stay together), then pool-adjacent-violators runs on the groups' means."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, np.float64)[order], np.asarray(y, np.float64)[order]
    edges = np.unique(np.quantile(x, np.linspace(0, 1, bins + 1)))
    group = np.searchsorted(edges, x, side="right")
    _, start, count = np.unique(group, return_index=True, return_counts=True)
    xs = np.add.reduceat(x, start) / count
    ys = np.add.reduceat(y, start) / count
    # pool adjacent violators over the groups (weights: their sizes)
    values, weights, sizes = [], [], []
    for value, weight in zip(ys, count):
        values.append(value), weights.append(float(weight)), sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2], sizes[-2] = w, sizes[-2] + sizes[-1]
            del values[-1], weights[-1], sizes[-1]
    return xs, np.repeat(values, sizes)


@dataclass
class Calibration:
    """Per horizon (1, 2, ...): breakpoints from score to probability of being needed."""

    scores: list[np.ndarray]
    probabilities: list[np.ndarray]
    source: dict = field(default_factory=dict)
    """What it was fitted on and how well: traces, split, tokens, Brier score before and after."""

    def apply(self, scores: np.ndarray, horizons: list[int] | None = None) -> np.ndarray:
        """Probabilities for scores (N, H, E) whose columns are ``horizons`` (default 1..H)."""
        scores = np.asarray(scores, dtype=np.float32)
        horizons = horizons or list(range(1, scores.shape[1] + 1))
        out = np.empty_like(scores)
        for column, horizon in enumerate(horizons):
            h = min(horizon, len(self.scores)) - 1
            out[:, column] = np.interp(scores[:, column], self.scores[h], self.probabilities[h])
        return out

    def to_dict(self) -> dict:
        return {
            "horizons": [
                {"scores": x.round(7).tolist(), "probabilities": y.round(6).tolist()}
                for x, y in zip(self.scores, self.probabilities)
            ],
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        horizons = data["horizons"]
        return cls(
            [np.asarray(h["scores"], np.float64) for h in horizons],
            [np.asarray(h["probabilities"], np.float64) for h in horizons],
            data.get("source", {}),
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CALIBRATION_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Calibration | None:
        """The calibration saved beside a predictor, or None if there is none."""
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: not a valid calibration ({exc}); delete it to fit it again") from None


def fit_calibration(predictor, data: TraceDataset, *, max_tokens: int = 8192) -> Calibration:
    """Fit a predictor's calibration on (up to ``max_tokens`` tokens of) ``data``, its inputs
    as the predictor reads them (hidden states, earlier tokens)."""
    horizons = predictor.horizons
    pairs: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(horizons)]
    seen = 0
    for batch in data.iter_batches(2048):
        batch_ids = batch.expert_ids.numpy()
        experts = data.num_experts
        for layer in range(data.num_layers - 1):
            scores = predictor.predict_proba(batch.context(layer)).float().numpy()  # (N, H, E)
            for h in range(min(horizons, data.num_layers - 1 - layer)):
                needed = np.zeros((len(batch_ids), experts + 1), dtype=bool)
                target = batch_ids[:, layer + h + 1]  # (N, k); -1: dropped
                np.put_along_axis(needed, np.where(target >= 0, target, experts), True, -1)
                pairs[h].append((scores[:, h], needed[:, :experts]))
        seen += len(batch_ids)
        if seen >= max_tokens:
            break
    if seen == 0:
        raise InputError(f"no tokens in the {data.split} split to calibrate {predictor.name} on")
    fitted = [h for h in pairs if h]
    xs, ys, before, after = [], [], [], []
    for parts in fitted:
        x = np.concatenate([p[0].reshape(-1) for p in parts])
        y = np.concatenate([p[1].reshape(-1) for p in parts]).astype(np.float64)
        bx, by = isotonic(x, y)
        xs.append(bx), ys.append(by)
        before.append(float(np.mean((np.clip(x, 0, 1) - y) ** 2)))
        after.append(float(np.mean((np.interp(x, bx, by) - y) ** 2)))
    source = {
        "predictor": predictor.name,
        "traces": str(data.store.directory),
        "split": data.split,
        "split_seed": data.seed,
        "tokens": seen,
        "brier_before": [round(v, 6) for v in before],
        "brier_after": [round(v, 6) for v in after],
    }
    return Calibration(xs, ys, source)


def calibration_for(predictor, directory: str | Path, store, *, split_seed: int = 0, log=print) -> Calibration:
    """The calibration beside the predictor saved in ``directory``, fitted on the validation
    split of trace store ``store`` (and saved there) if there is none yet or it was fitted on
    other traces or another split."""
    data = TraceDataset(
        store, "val", seed=split_seed, previous_tokens=predictor.previous_tokens, hidden=predictor.needs_hidden
    )
    found = Calibration.load(directory)
    fitted_on = (found.source.get("traces"), found.source.get("split_seed")) if found is not None else None
    if fitted_on == (str(data.store.directory), data.seed):
        return found
    fitted = fit_calibration(predictor, data)
    try:
        path = fitted.save(directory)
        log(f"calibrated {predictor.name} on the {data.split} split of {data.store.directory}: {path}")
    except OSError as exc:  # a read-only predictor directory: use it unsaved
        log(f"calibrated {predictor.name} (not saved: {exc})")
    return fitted
