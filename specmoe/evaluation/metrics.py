"""The metrics of docs/design.md, defined once: ``top1_acc``, ``hit1``, ``recall@m``, per horizon
and per target layer, with 95% bootstrap intervals over documents and chance levels."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

METRICS = ("top1_acc", "hit1", "recall_at_k", "recall_at_2k")


def token_metrics(scores: torch.Tensor, true_ids: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Per-token metric values for scores (N, E) against the true (N, k) experts (-1 = dropped
    slot). Tokens whose true top-1 was dropped have no expert to predict; callers skip them."""
    valid = true_ids >= 0
    k_eff = valid.sum(-1).clamp_min(1).float()
    ranked = scores.topk(min(2 * top_k, scores.shape[-1]), dim=-1).indices  # (N, 2k)
    member = (ranked[:, :, None] == true_ids[:, None, :]) & valid[:, None, :]  # (N, 2k, k)
    hit_at = member.any(-1)  # (N, 2k): is the r-th guess among the true experts
    return {
        "top1_acc": (ranked[:, 0] == true_ids[:, 0]).float(),
        "hit1": hit_at[:, 0].float(),
        "recall_at_k": hit_at[:, :top_k].sum(-1).float() / k_eff,
        "recall_at_2k": hit_at[:, : 2 * top_k].sum(-1).float() / k_eff,
    }


def chance_levels(num_experts: int, top_k: int) -> dict[str, float]:
    """Expected value of each metric for a uniformly random ranking of the experts."""
    return {
        "top1_acc": 1 / num_experts,
        "hit1": top_k / num_experts,
        "recall_at_k": min(1.0, top_k / num_experts),
        "recall_at_2k": min(1.0, 2 * top_k / num_experts),
    }


class MetricAccumulator:
    """Sums of per-token metrics per (horizon, target layer, document), for pooled means and
    document-level bootstrap intervals."""

    def __init__(self):
        self.doc_index: dict[str, int] = {}
        self.sums: dict[tuple[int, int], dict[str, defaultdict]] = {}

    def add(self, horizon: int, layer: int, doc_ids: np.ndarray, values: dict[str, torch.Tensor]) -> None:
        docs = np.array([self.doc_index.setdefault(d, len(self.doc_index)) for d in doc_ids])
        cell = self.sums.setdefault((horizon, layer), {name: defaultdict(float) for name in (*METRICS, "n")})
        uniq, inverse = np.unique(docs, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(uniq))
        per_doc = {name: np.bincount(inverse, weights=values[name].numpy(), minlength=len(uniq)) for name in METRICS}
        for j, doc in enumerate(uniq):
            cell["n"][doc] += counts[j]
            for name in METRICS:
                cell[name][doc] += per_doc[name][j]

    def _dense(self, cells: list[dict]) -> dict[str, np.ndarray]:
        out = {name: np.zeros(len(self.doc_index)) for name in (*METRICS, "n")}
        for cell in cells:
            for name, values in cell.items():
                for doc, v in values.items():
                    out[name][doc] += v
        return out

    def rows(self, bootstrap: int = 1000, seed: int = 0) -> list[dict]:
        rng = np.random.default_rng(seed)
        num_docs = len(self.doc_index)
        resample = rng.multinomial(num_docs, np.full(num_docs, 1 / num_docs), size=bootstrap) if bootstrap else None
        rows = []
        horizons = sorted({h for h, _ in self.sums})
        for h in horizons:
            layers = sorted(l for hh, l in self.sums if hh == h)
            groups = [(layer, [self.sums[(h, layer)]]) for layer in layers]
            groups.append(("all", [self.sums[(h, layer)] for layer in layers]))
            for layer, cells in groups:
                dense = self._dense(cells)
                n = dense["n"].sum()
                row = {"horizon": h, "layer": layer, "n_tokens": int(n)}
                for name in METRICS:
                    row[name] = float(dense[name].sum() / max(n, 1))
                    if resample is not None:
                        boot = (resample @ dense[name]) / np.maximum(resample @ dense["n"], 1)
                        row[f"{name}_ci"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
                rows.append(row)
        return rows


class CalibrationAccumulator:
    """Reliability of the confidence: the predicted probability of the best-scored expert
    against how often it is the true top-1, in equal-width bins, per horizon."""

    def __init__(self, bins: int = 10):
        self.bins = bins
        self.counts: dict[int, np.ndarray] = {}  # horizon -> (bins, 3): n, sum of confidence, sum correct

    def add(self, horizon: int, scores: torch.Tensor, correct: torch.Tensor) -> None:
        probs = scores.clamp_min(0)
        confidence = (probs.max(-1).values / probs.sum(-1).clamp_min(1e-12)).numpy()  # (N,)
        which = np.minimum((confidence * self.bins).astype(np.int64), self.bins - 1)
        table = self.counts.setdefault(horizon, np.zeros((self.bins, 3)))
        np.add.at(table, which, np.stack([np.ones_like(confidence), confidence, correct.numpy()], 1))

    def rows(self) -> list[dict]:
        out = []
        for horizon, table in sorted(self.counts.items()):
            n = table[:, 0]
            total = max(n.sum(), 1)
            filled = n > 0
            confidence = np.divide(table[:, 1], n, out=np.zeros_like(n), where=filled)
            accuracy = np.divide(table[:, 2], n, out=np.zeros_like(n), where=filled)
            out.append(
                {
                    "horizon": horizon,
                    "bin_edges": np.linspace(0, 1, self.bins + 1).round(4).tolist(),
                    "n": n.astype(int).tolist(),
                    "mean_confidence": confidence.round(5).tolist(),
                    "accuracy": accuracy.round(5).tolist(),
                    "ece": float((n / total * np.abs(confidence - accuracy)).sum()),
                }
            )
        return out


def evaluate_predictor(
    predictor,
    data,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 4096,
    calibration: CalibrationAccumulator | None = None,
) -> list[dict]:
    """Score ``predictor`` on every token and layer of ``data``; rows per horizon and target
    layer, plus ``layer="all"`` (pooled over layers) per horizon. ``calibration``, if given,
    collects the reliability of the top-1 confidence."""
    acc = MetricAccumulator()
    horizons = predictor.horizons
    with torch.no_grad():
        for batch in data.iter_batches(batch_size):
            for layer in range(data.num_layers - 1):
                scores = predictor.predict_proba(batch.context(layer))  # (N, H, E)
                for h in range(1, horizons + 1):
                    if layer + h >= data.num_layers:
                        break
                    true = batch.expert_ids[:, layer + h]
                    scored = true[:, 0] >= 0
                    values = token_metrics(scores[scored, h - 1].float(), true[scored], data.top_k)
                    acc.add(h, layer + h, batch.doc_ids[scored.numpy()], values)
                    if calibration is not None:
                        calibration.add(h, scores[scored, h - 1].float(), values["top1_acc"])
    chance = chance_levels(data.num_experts, data.top_k)
    rows = acc.rows(bootstrap, seed)
    for row in rows:
        row["predictor"] = predictor.name
        row.update({f"chance_{name}": round(value, 6) for name, value in chance.items()})
    return rows
