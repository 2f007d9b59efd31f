"""Read what a run directory's stages wrote, and condense it into ``summary.json``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from specmoe import __version__
from specmoe.errors import InputError
from specmoe.predictors.registry import predictor_label
from specmoe.report.card import model_card
from specmoe.report.findings import findings

HEADLINE_FRACTION = 0.25
"""The fast-tier size the issue's targets are stated at."""


def _json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "stages.json").exists():
        raise InputError(f"{run_dir} is not a specmoe run directory (no stages.json); create one with `specmoe run`")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics, skipped = {}, {}
    for spec in config["predictors"]["models"]:  # not leftovers of an earlier config
        label = predictor_label(spec["name"], spec.get("preset"))
        result = _json(run_dir / "metrics" / f"{label}.json")
        if result is not None:
            (skipped if "reason" in result else metrics)[label] = result
    return {
        "dir": run_dir,
        "config": config,
        "stages": _json(run_dir / "stages.json"),
        "traces": _json(run_dir / "traces.json"),
        "metrics": metrics,
        "skipped": {label: r["reason"] for label, r in skipped.items()},
        "simulation": _json(run_dir / "simulation" / "simulation.json"),
        "offload": _json(run_dir / "offload" / "offload.json"),
        "summary": _json(run_dir / "summary.json"),
    }


SIMULATION_KEYS = (
    "policy",
    "eviction",
    "predictor",
    "cache_fraction",
    "batch_size",
    "tokens_per_s",
    "stall_ms_per_token",
    "hit_rate",
    "stall_fraction",
    "speedup_vs_on_demand",
    "oracle_gap_closed",
)
OFFLOAD_KEYS = (
    "policy",
    "predictor",
    "cache_fraction",
    "batch_size",
    "tokens_per_s",
    "tokens_per_s_range",
    "stall_ms_per_token",
    "stall_ms_per_token_range",
    "hit_rate",
    "stall_fraction",
    "speedup_vs_on_demand",
    "fraction_of_oracle",
)
SPREAD_WARNING = 0.2
"""A configuration whose repeats differ by more than this fraction of their median is noise
beside most differences between policies."""
INTERFERENCE_WARNING = 1.5
"""A layer computing this many times slower beside a loader means heavy interference."""


def with_spread(rows: list[dict]) -> list[dict]:
    """Measured rows with the range of their repeats: tokens/s and stall per token."""
    out = []
    for r in rows:
        tokens = r["tokens"]
        # With the median's own figure: the stored seconds are rounded, and the median must
        # not fall outside the range printed beside it.
        speeds = [r["tokens_per_s"], *(tokens / s for s in r.get("seconds_all_repeats", [r["seconds"]]))]
        stalls = r.get("stall_ms_per_token_all_repeats") or [1e3 * r["stall_fraction"] * r["seconds"] / tokens]
        out.append(
            r
            | {
                "tokens_per_s_range": [min(speeds), max(speeds)],
                "stall_ms_per_token": sorted(stalls)[len(stalls) // 2],
                "stall_ms_per_token_range": [min(stalls), max(stalls)],
            }
        )
    return out


def noise_warnings(offload: dict) -> list[str]:
    """Plain sentences where the measured rows cannot be ranked: repeats that spread more than
    policies differ, an oracle that is not the fastest, a machine busy enough to skew them."""
    warnings, rows = [], with_spread(offload["rows"])
    for fraction in sorted({r["cache_fraction"] for r in rows}):
        group = [r for r in rows if r["cache_fraction"] == fraction]
        spread = max((hi - lo) / r["tokens_per_s"] for r in group for lo, hi in [r["tokens_per_s_range"]])
        speeds = sorted(r["tokens_per_s"] for r in group if r["policy"] != "on-demand")
        gap = (speeds[-1] - speeds[0]) / speeds[-1] if len(speeds) > 1 else 0.0
        if spread > SPREAD_WARNING and spread > gap:
            warnings.append(
                f"At a {100 * fraction:.0f}% fast tier, repeats of one configuration differ by up to "
                f"{100 * spread:.0f}% in tokens/s, more than the policies differ ({100 * gap:.0f}%): tokens/s do "
                "not rank them here; stall per token, which the policies control, is the steadier measure."
            )
        oracle = next((r for r in group if r["policy"] == "oracle"), None)
        if oracle is not None and oracle["tokens_per_s"] < max(r["tokens_per_s"] for r in group):
            warnings.append(
                f"At a {100 * fraction:.0f}% fast tier the oracle was not the fastest: the machine, not the policy, "
                "set these tokens/s (other work running?)."
            )
    probe = offload.get("machine", {}).get("interference") or {}
    if probe.get("layer_compute_ms") and probe.get("layer_compute_ms_while_loading"):
        slowdown = probe["layer_compute_ms_while_loading"] / probe["layer_compute_ms"]
        if slowdown > INTERFERENCE_WARNING:
            warnings.append(
                f"A layer computed {slowdown:.1f}x slower while an expert was being read (the machine probe): "
                "reads and compute compete for this machine's cores, and prefetching cannot hide reads fully."
            )
    return warnings


def headline_fraction(rows: list[dict]) -> float:
    """The fast-tier size of ``rows`` nearest the headline one."""
    return min({r["cache_fraction"] for r in rows}, key=lambda f: abs(f - HEADLINE_FRACTION))


def _headline_rows(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """The rows at the headline fast-tier size, every batch size, trimmed to ``keys``."""
    if not rows:
        return []
    fraction = headline_fraction(rows)
    return [
        {k: r.get(k, 1 if k == "batch_size" else None) for k in keys} for r in rows if r["cache_fraction"] == fraction
    ]


def predictor_rows(metrics: dict[str, dict]) -> list[dict]:
    out = []
    for label, result in metrics.items():
        pooled = sorted((r for r in result["rows"] if r["layer"] == "all"), key=lambda r: r["horizon"])
        cost = result["cost"]
        calibration = {c["horizon"]: c["ece"] for c in result.get("calibration", [])}
        out.append(
            {
                "label": label,
                "horizons": [
                    {
                        key: r.get(key)
                        for key in (
                            "horizon",
                            "top1_acc",
                            "top1_acc_ci",
                            "recall_at_k",
                            "recall_at_k_ci",
                            "recall_at_2k",
                            "n_tokens",
                        )
                    }
                    for r in pooled
                ],
                "ece_h1": calibration.get(1),
                "params": cost["params"],
                "latency_us_per_token_layer": cost["latency_us_per_token_layer"],
                "fraction_of_model_time": cost["fraction_of_model_time"],
                "fit_seconds": result.get("fit_seconds"),
            }
        )
    out.sort(key=lambda r: -r["horizons"][0]["recall_at_k"])
    return out


def summarize(run: dict, *, command: str, seconds: float) -> dict:
    """``summary.json`` of a loaded run (:func:`load_run`): the headline figures, the model
    card and the findings the report opens with."""
    traces, metrics = run["traces"], run["metrics"]
    first = next(iter(metrics.values()), None)
    chance = {k[len("chance_") :]: v for k, v in first["rows"][0].items() if k.startswith("chance_")} if first else {}
    summary = {
        "specmoe_version": __version__,
        "command": command,
        "seconds_this_invocation": round(seconds, 1),
        "stage_seconds": {name: r.get("seconds") for name, r in run["stages"].items()},
        "model": {k: traces[k] for k in ("model", "model_type", "num_layers", "num_experts", "top_k", "stacks")},
        "traces": {k: traces[k] for k in ("path", "num_tokens", "num_documents", "seq_len", "texts")},
        "split_seed": run["config"]["predictors"]["split_seed"],
        "predictors": predictor_rows(metrics),
        "predictors_skipped": run["skipped"],
        "chance": chance,
    }
    if run["simulation"]:
        summary["simulation"] = {
            "simulated": True,
            "hardware": run["simulation"]["hardware"],
            "expert_bytes": run["simulation"]["expert_bytes"],
            "rows": _headline_rows(run["simulation"]["rows"], SIMULATION_KEYS),
        }
    if run["offload"]:
        summary["offload"] = {
            "simulated": False,
            "what": "measured replay: recorded routing, random experts of a real shape read from disk",
            "expert_shape": run["offload"]["expert_shape"],
            "repeats": run["offload"]["repeats"],
            "rows": _headline_rows(with_spread(run["offload"]["rows"]), OFFLOAD_KEYS),
            "warnings": noise_warnings(run["offload"]),
        }
    summary["model_card"] = model_card(traces["model"], traces)
    summary["findings"] = findings(summary)
    return summary
