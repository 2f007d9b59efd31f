"""Figures of a run. Each function takes the JSON a stage wrote and returns a matplotlib
Figure; simulated figures say SIMULATION in their title, measured ones say what was real."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

METRIC_LABELS = {"top1_acc": "top-1 accuracy", "recall_at_k": "recall@k", "recall_at_2k": "recall@2k"}
MARKERS = "osD^vP*Xh<>p"
LINESTYLES = ("-", "--", "-.", ":")
LINE_SHIFT = 0.05
"""Sideways shift between neighbouring lines of a metric plot, in units of its x axis."""


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def usage_heatmap(traces: dict) -> Figure:
    """Share of each layer's routed slots that went to each expert, experts sorted by use."""
    stack = next(iter(traces["statistics"].values()))
    usage = np.asarray(stack["usage_counts"], dtype=float)  # (L, E)
    share = usage / np.maximum(usage.sum(1, keepdims=True), 1)
    fig, (ax, ax_entropy) = plt.subplots(1, 2, figsize=(11, 0.45 * len(share) + 2), width_ratios=[4, 1])
    image = ax.imshow(share, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"expert usage per layer ({traces['num_tokens']:,} tokens of {traces['model']})")
    fig.colorbar(image, ax=ax, label="share of routed slots")
    entropy = [row["usage_entropy_bits"] for row in stack["layers"]]
    ax_entropy.barh(range(len(entropy)), entropy, color="tab:blue")
    ax_entropy.axvline(np.log2(traces["num_experts"]), color="grey", linestyle="--", label="uniform")
    ax_entropy.invert_yaxis()
    ax_entropy.set_xlabel("routing entropy (bits)")
    ax_entropy.legend(fontsize=8)
    return fig


def _line_style(index: int) -> dict:
    """The ``index``-th line's own marker and dashes, hollow markers every other line: lines
    that coincide stay visible."""
    return {
        "marker": MARKERS[index % len(MARKERS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "markerfacecolor": "none" if index % 2 else None,
    }


def _headline(result: dict, horizon: int) -> dict:
    return next(r for r in result["rows"] if r["horizon"] == horizon and r["layer"] == "all")


def predictor_comparison(metrics: dict[str, dict], top_k: int, horizon: int = 1) -> Figure:
    """Top-1 and recall@k at one horizon, with 95% bootstrap intervals and chance levels (one
    bar per predictor when k = 1, where the two are equal)."""
    labels = sorted(metrics, key=lambda k: -_headline(metrics[k], horizon)["recall_at_k"])
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(labels) + 2), 4))
    x = np.arange(len(labels))
    bars = (
        ((0.0, "recall_at_k", "tab:orange"),)
        if top_k == 1
        else ((-0.2, "top1_acc", "tab:blue"), (0.2, "recall_at_k", "tab:orange"))
    )
    for offset, metric, color in bars:
        name = "top-1 = recall@k" if top_k == 1 else METRIC_LABELS[metric]
        rows = [_headline(metrics[k], horizon) for k in labels]
        values = np.array([r[metric] for r in rows])
        ci = np.array([r.get(f"{metric}_ci", [r[metric], r[metric]]) for r in rows])
        ax.bar(
            x + offset,
            values,
            0.4,
            color=color,
            label=name,
            yerr=[values - ci[:, 0], ci[:, 1] - values],
            capsize=3,
        )
        ax.axhline(
            rows[0][f"chance_{metric}"],
            color=color,
            linestyle=":",
            linewidth=1,
            label=f"chance {name}",
        )
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"test split, horizon {horizon}")
    ax.set_title("predictors (bars: 95% bootstrap interval over documents)")
    ax.legend(fontsize=8, ncol=2)
    return fig


def accuracy_by(metrics: dict[str, dict], axis: str, metric: str = "recall_at_k") -> Figure:
    """``metric`` against the horizon (pooled over layers) or the target layer (horizon 1)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    chance, ticks = None, set()
    for index, (label, result) in enumerate(sorted(metrics.items())):
        if axis == "horizon":
            rows = sorted((r for r in result["rows"] if r["layer"] == "all"), key=lambda r: r["horizon"])
            xs = [r["horizon"] for r in rows]
        else:
            rows = sorted(
                (r for r in result["rows"] if r["horizon"] == 1 and r["layer"] != "all"), key=lambda r: r["layer"]
            )
            xs = [r["layer"] for r in rows]
        ys = [r[metric] for r in rows]
        low = [r.get(f"{metric}_ci", [v, v])[0] for r, v in zip(rows, ys)]
        high = [r.get(f"{metric}_ci", [v, v])[1] for r, v in zip(rows, ys)]
        # Predictors that score alike would hide each other: each line gets its own marker and
        # dashes, and a small sideways shift.
        shift = LINE_SHIFT * (index - (len(metrics) - 1) / 2)
        ticks.update(xs)
        xs = [x + shift for x in xs]
        (line,) = ax.plot(xs, ys, label=label, **_line_style(index))
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
        chance = rows[0][f"chance_{metric}"] if rows else chance
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("horizon h (layers ahead)" if axis == "horizon" else "target MoE layer (h = 1)")
    ax.set_ylabel(f"{METRIC_LABELS[metric]} (test)")
    ax.set_ylim(0, 1)
    if ticks:
        ax.set_xticks(sorted(ticks))
        ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def calibration(metrics: dict[str, dict], horizon: int = 1) -> Figure:
    """Reliability diagram: mean confidence of the best-scored expert against its accuracy."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    for index, (label, result) in enumerate(sorted(metrics.items())):
        table = next((c for c in result.get("calibration", []) if c["horizon"] == horizon), None)
        if table is None:
            continue
        filled = [i for i, n in enumerate(table["n"]) if n > 0]
        ax.plot(
            [table["mean_confidence"][i] for i in filled],
            [table["accuracy"][i] for i in filled],
            label=f"{label} (ECE {table['ece']:.3f})",
            **_line_style(index),
        )
    ax.set_xlabel("confidence: predicted probability of the best expert")
    ax.set_ylabel("how often it was the true top-1")
    ax.set_title(f"calibration, horizon {horizon} (test)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return fig


def human_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def policy_label(row: dict) -> str:
    """The policy's name, with the predictor driving it."""
    return row["policy"] + (f":{row['predictor']}" if row.get("predictor") else "")


def speed_vs_memory(rows: list[dict], title: str, ylabel: str) -> Figure:
    """Tokens/s against fast-tier size per policy, one panel per batch size."""
    batch_sizes = sorted({r.get("batch_size", 1) for r in rows})
    fig, axes = plt.subplots(1, len(batch_sizes), figsize=(6 * len(batch_sizes), 4.2), squeeze=False)
    for ax, batch_size in zip(axes[0], batch_sizes):
        mine = [r for r in rows if r.get("batch_size", 1) == batch_size]
        labels = sorted({policy_label(r) for r in mine}, key=lambda s: (s != "on-demand", s.startswith("oracle"), s))
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors[: max(len(labels), 1)])  # distinct beyond 10 policies
        for label in labels:
            series = sorted((r for r in mine if policy_label(r) == label), key=lambda r: r["cache_fraction"])
            ax.plot(
                [100 * r["cache_fraction"] for r in series],
                [r["tokens_per_s"] for r in series],
                marker="o",
                label=label,
                linestyle="--" if label in ("on-demand", "oracle") else "-",
            )
        ax.set_xlabel("fast tier (% of all experts)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"batch {batch_size}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def stall_breakdown(rows: list[dict], cache_fraction: float, title: str) -> Figure:
    """Time per token split into waiting for experts and everything else, per policy."""
    mine = [r for r in rows if r["cache_fraction"] == cache_fraction and r.get("batch_size", 1) == 1]
    mine.sort(key=lambda r: -1 / r["tokens_per_s"])
    labels = [policy_label(r) for r in mine]
    per_token_ms = np.array([1e3 / r["tokens_per_s"] for r in mine])
    stall = per_token_ms * np.array([r["stall_fraction"] for r in mine])
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(mine) + 1.5))
    ax.barh(labels, stall, color="tab:red", label="stalled on expert transfers")
    ax.barh(labels, per_token_ms - stall, left=stall, color="tab:green", label="compute and other")
    ax.set_xlabel("ms per token")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def simulated_speed(simulation: dict) -> Figure:
    hw = simulation["hardware"]
    title = (
        f"SIMULATION — {simulation['model']}: {hw['name']} link {hw['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"{human_bytes(simulation['expert_bytes'])}/expert, compute {hw['compute_s_per_layer'] * 1e3:.2f} ms/layer"
    )
    return speed_vs_memory(simulation["rows"], title, "tokens/s (simulated)")


def measured_speed(offload: dict) -> Figure:
    shape = offload["expert_shape"]
    title = (
        f"MEASURED replay — routing recorded from {offload['routing_from']}; random bf16 experts "
        f"{shape['hidden']}x{shape['ffn']} ({human_bytes(shape['bytes'])}) read from {offload['slow_tier']}"
    )
    return speed_vs_memory(offload["rows"], title, "tokens/s (measured)")
