"""The metrics of docs/design.md, defined once: ``top1_acc``, ``hit1``, ``exact_match``,
``recall@m`` for m = k, 1.5k, 2k, 3k, per horizon and per target layer, with 95% bootstrap
intervals over documents and chance levels. docs/predictors.md says which published figure
each one corresponds to."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

RECALL_WIDTHS = {"recall_at_k": 1.0, "recall_at_1.5k": 1.5, "recall_at_2k": 2.0, "recall_at_3k": 3.0}
"""recall@m as a multiple of k: the coverage a prefetch set of m experts per layer buys."""
METRICS = ("top1_acc", "hit1", "exact_match", *RECALL_WIDTHS)


def recall_width(name: str, top_k: int, num_experts: int) -> int:
    """m of ``recall_at_<m>``: the multiple of k rounded up, at most E."""
    return min(num_experts, math.ceil(RECALL_WIDTHS[name] * top_k))


def token_metrics(scores: torch.Tensor, true_ids: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """Per-token metric values for scores (N, E) against the true (N, k) experts (-1 = dropped
    slot). Tokens whose true top-1 was dropped have no expert to predict; callers skip them."""
    valid = true_ids >= 0
    k_eff = valid.sum(-1).clamp_min(1).float()
    num_experts = scores.shape[-1]
    widest = max(recall_width(name, top_k, num_experts) for name in RECALL_WIDTHS)
    ranked = scores.topk(widest, dim=-1).indices  # (N, 3k)
    member = (ranked[:, :, None] == true_ids[:, None, :]) & valid[:, None, :]  # (N, 3k, k)
    hit_at = member.any(-1)  # (N, 3k): is the r-th guess among the true experts
    recalls = {
        name: hit_at[:, : recall_width(name, top_k, num_experts)].sum(-1).float() / k_eff for name in RECALL_WIDTHS
    }
    return {
        "top1_acc": (ranked[:, 0] == true_ids[:, 0]).float(),
        "hit1": hit_at[:, 0].float(),
        "exact_match": (hit_at[:, :top_k].sum(-1) == valid.sum(-1)).float(),  # the whole true set in the top k
        **recalls,
    }


def chance_levels(num_experts: int, top_k: int) -> dict[str, float]:
    """Expected value of each metric for a uniformly random ranking of the experts."""
    return {
        "top1_acc": 1 / num_experts,
        "hit1": top_k / num_experts,
        "exact_match": 1 / math.comb(num_experts, top_k),
        **{name: recall_width(name, top_k, num_experts) / num_experts for name in RECALL_WIDTHS},
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
        row.update({f"chance_{name}": float(f"{value:.6g}") for name, value in chance.items()})
    return rows


def evaluate_next_token(
    predictor,
    data,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 4096,
    source_layers: list[int] | None = None,
) -> list[dict]:
    """Score a cross-token predictor (``predict_next``) on every token of ``data`` that has a
    next one (in decoding traces: one the model chose): asked after each of ``source_layers``
    of token t (default: all it serves), against token t+1's layers 0..depth-1. Rows as
    :func:`evaluate_predictor`'s, per source layer: ``horizon`` = L - source + j counts the
    layers from token t's source layer to token t+1's layer j (``layer``); ``guess_accuracy``
    is how often the predictor's own top next-token guess, if it makes one, is the token."""
    sources = list(source_layers if source_layers is not None else predictor.source_layers())
    accumulators = {source: MetricAccumulator() for source in sources}
    guesses = {source: [0, 0] for source in sources}  # right, asked
    num_layers = data.num_layers
    with torch.no_grad():
        for batch in data.iter_batches(batch_size):
            has_next = batch.next_expert_ids[:, 0, 0] >= 0
            if not has_next.any():
                continue
            rows = has_next.nonzero()[:, 0]
            for source in sources:
                context = batch.context(source).select(rows)
                scores = predictor.predict_next(context)  # (n, depth, E)
                if hasattr(predictor, "guess"):
                    top = torch.from_numpy(predictor.guess(context)[0][:, 0])
                    guesses[source][0] += int((top == batch.next_token_ids[rows]).sum())
                    guesses[source][1] += len(rows)
                for j in range(scores.shape[1]):
                    true = batch.next_expert_ids[rows, j]
                    values = token_metrics(scores[:, j].float(), true, data.top_k)
                    accumulators[source].add(num_layers - source + j, j, batch.doc_ids[rows.numpy()], values)
    chance = chance_levels(data.num_experts, data.top_k)
    out = []
    for source, acc in accumulators.items():
        right, asked = guesses[source]
        for row in acc.rows(bootstrap, seed):
            row.update(predictor=predictor.name, source_layer=source, crosses_token=True)
            row.update({f"chance_{name}": float(f"{value:.6g}") for name, value in chance.items()})
            if asked:
                row["guess_accuracy"] = right / asked
            out.append(row)
    return out
