"""The report's opening summary: what was measured and what it means, in sentences made from
``summary.json``'s numbers. Each finding keeps the numbers its sentence states, so the
sentence and ``summary.json`` cannot disagree, and no sentence claims a difference that the
bootstrap intervals (predictors) or the spread of repeats (measured offload) do not support."""

from __future__ import annotations

from specmoe.offload.policy import POLICIES


def _interval(value: float, ci: list[float] | None, digits: int) -> str:
    if ci is None:
        return f"{value:.{digits}f} (no interval)"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}–{ci[1]:.{digits}f}]"


def compare(a: list[float], b: list[float], *, higher_is_better: bool) -> str:
    """``better`` when a's whole range lies on the good side of b's, ``worse`` when on the
    bad side, else ``within the spread``: ranges that overlap rank nothing."""
    if a[0] > b[1]:
        return "better" if higher_is_better else "worse"
    if a[1] < b[0]:
        return "worse" if higher_is_better else "better"
    return "within the spread"


def intervals_overlap(a: list[float] | None, b: list[float] | None) -> bool | None:
    return None if a is None or b is None else a[0] <= b[1] and b[0] <= a[1]


def predictor_findings(summary: dict) -> list[dict]:
    """Per horizon: the predictor with the best recall@k, and whether its 95% interval
    clears the runner-up's."""
    top_k = summary["model"]["top_k"]
    chance = summary["chance"].get("recall_at_k")
    horizons = sorted({h["horizon"] for p in summary["predictors"] for h in p["horizons"]})
    out = []
    for horizon in horizons:
        ranked = sorted(
            (
                {"label": p["label"], "value": h["recall_at_k"], "ci": h.get("recall_at_k_ci")}
                for p in summary["predictors"]
                for h in p["horizons"]
                if h["horizon"] == horizon
            ),
            key=lambda entry: -entry["value"],
        )
        best, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else None
        overlap = intervals_overlap(best["ci"], runner_up["ci"]) if runner_up else None
        metric = f"recall@k (k={top_k}{', the same as top-1' if top_k == 1 else ''})"
        if runner_up is None:
            sentence = f"Horizon {horizon}: {best['label']}, the only predictor, reaches {metric} "
            sentence += _interval(best["value"], best["ci"], 3)
        else:
            verdict = {
                True: "the intervals overlap, so the data do not separate them",
                False: f"the intervals do not overlap: {best['label']} is better",
                None: "without intervals no win is claimed",
            }[overlap]
            sentence = (
                f"Horizon {horizon}: {best['label']} predicts best, {metric} {_interval(best['value'], best['ci'], 3)}; "
                f"runner-up {runner_up['label']}: {_interval(runner_up['value'], runner_up['ci'], 3)}; {verdict}"
            )
        if chance is not None:
            sentence += f"; chance {chance:.3f}"
        out.append(
            {
                "horizon": horizon,
                "metric": "recall_at_k",
                "best": best,
                "runner_up": runner_up,
                "intervals_overlap": overlap,
                "chance": chance,
                "sentence": sentence + ".",
            }
        )
    return out


def _label(row: dict) -> str:
    return row["policy"] + (f":{row['predictor']}" if row.get("predictor") else "")


def _kind(row: dict) -> str:
    policy = POLICIES.get(row["policy"])
    return policy.kind if policy else "other"


def _headline_batch(rows: list[dict]) -> list[dict]:
    """The rows of the smallest batch size: one decode stream, the case the report leads with."""
    smallest = min(r.get("batch_size", 1) for r in rows)
    return [r for r in rows if r.get("batch_size", 1) == smallest]


def _measured_view(row: dict) -> dict:
    keys = ("tokens_per_s", "tokens_per_s_range", "stall_ms_per_token", "stall_ms_per_token_range")
    return {"policy": _label(row)} | {key: row[key] for key in keys}


def _measured_figures(view: dict) -> str:
    return (
        f"{_interval(view['tokens_per_s'], view['tokens_per_s_range'], 1)} tokens/s, "
        f"stall {_interval(view['stall_ms_per_token'], view['stall_ms_per_token_range'], 2)} ms/token"
    )


def _verdict(a: dict, b: dict, against: str, repeats: int) -> dict:
    if repeats < 2:
        return {
            "tokens_per_s": None,
            "stall_ms_per_token": None,
            "words": "one repeat, so no spread to judge by: no claim",
        }
    speed = compare(a["tokens_per_s_range"], b["tokens_per_s_range"], higher_is_better=True)
    stall = compare(a["stall_ms_per_token_range"], b["stall_ms_per_token_range"], higher_is_better=False)

    def words(verdict: str) -> str:
        return f"{verdict} of {against}" if verdict == "within the spread" else f"{verdict} than {against}"

    return {
        "tokens_per_s": speed,
        "stall_ms_per_token": stall,
        "words": f"tokens/s {words(speed)}, stall {words(stall)}",
    }


def measured_findings(offload: dict) -> dict | None:
    """Caching and prefetch against on-demand, and prefetch against caching, in the measured
    replay at the headline fast tier and the smallest batch, each judged by the spread of
    its repeats."""
    rows = _headline_batch(offload["rows"])
    floor = next((r for r in rows if _kind(r) == "floor"), None)
    if floor is None:
        return None
    repeats = offload["repeats"]
    on_demand = _measured_view(floor)
    finding = {
        "fast_tier": floor["cache_fraction"],
        "batch_size": floor.get("batch_size", 1),
        "repeats": repeats,
        "on_demand": on_demand,
        "sentences": [
            (
                f"MEASURED replay, fast tier {100 * floor['cache_fraction']:.0f}%, batch {floor.get('batch_size', 1)}, "
                f"{repeats} repeat{'' if repeats == 1 else 's'}, median [min–max]: on-demand {_measured_figures(on_demand)}."
            )
        ],
    }
    if offload.get("warnings"):
        finding["sentences"].append("This machine's noise limits these figures: see the notes under MEASURED.")
    for kind, name in (("cache", "Caching"), ("prefetch", "Prefetch")):
        group = [r for r in rows if _kind(r) == kind]
        if not group:
            continue
        best = _measured_view(max(group, key=lambda r: r["tokens_per_s"]))
        verdict = _verdict(best, on_demand, "on-demand", repeats)
        finding[kind] = best | {
            "of": [_label(r) for r in group],
            "speedup_vs_on_demand": best["tokens_per_s"] / on_demand["tokens_per_s"],
            "verdict": verdict,
        }
        finding["sentences"].append(
            f"{name}, {best['policy']} (the best of {', '.join(finding[kind]['of'])} by median tokens/s): "
            f"{_measured_figures(best)}, {finding[kind]['speedup_vs_on_demand']:.2f}x on-demand; {verdict['words']}."
        )
    if "cache" in finding and "prefetch" in finding:
        cache, prefetch = finding["cache"], finding["prefetch"]
        verdict = _verdict(prefetch, cache, "caching", repeats)
        finding["prefetch_vs_cache"] = {"ratio": prefetch["tokens_per_s"] / cache["tokens_per_s"], "verdict": verdict}
        finding["sentences"].append(
            f"Prefetch ({prefetch['policy']}) against caching ({cache['policy']}): "
            f"{finding['prefetch_vs_cache']['ratio']:.2f}x in tokens/s; {verdict['words']}."
        )
    return finding


def simulated_findings(simulation: dict) -> list[dict]:
    """Per batch size: the best cache and the best prefetch in the cost model, as the share of
    the on-demand-to-oracle gap they close."""
    out = []
    for batch_size in sorted({r.get("batch_size", 1) for r in simulation["rows"]}):
        rows = [r for r in simulation["rows"] if r.get("batch_size", 1) == batch_size]
        finding = {"fast_tier": rows[0]["cache_fraction"], "batch_size": batch_size}
        parts = []
        for kind, name in (("cache", "the best cache"), ("prefetch", "the best prefetch")):
            group = [r for r in rows if _kind(r) == kind]
            if not group:
                continue
            best = max(group, key=lambda r: r["tokens_per_s"])
            finding[kind] = {
                "policy": _label(best),
                "of": [_label(r) for r in group],
                "oracle_gap_closed": best["oracle_gap_closed"],
                "speedup_vs_on_demand": best["speedup_vs_on_demand"],
            }
            gap = "n/a" if best["oracle_gap_closed"] is None else f"{best['oracle_gap_closed']:.3f}"
            parts.append(
                f"{name}, {_label(best)} (of {', '.join(finding[kind]['of'])}), closes {gap} of the gap from "
                f"on-demand to the oracle ({best['speedup_vs_on_demand']:.2f}x on-demand)"
            )
        if not parts:
            continue
        finding["sentence"] = (
            f"SIMULATION (cost model, not a measurement), fast tier {100 * finding['fast_tier']:.0f}%, "
            f"batch {batch_size}: " + "; ".join(parts) + "."
        )
        out.append(finding)
    return out


def findings(summary: dict) -> dict:
    """Every finding of the summary, with its sentence(s)."""
    traces = summary["traces"]
    out = {
        "scope": (
            f"Measured: {traces['num_tokens']:,} tokens of {summary['model']['model']} from "
            f"{traces['num_documents']:,} documents; predictors scored on the test split of the documents."
        ),
        "predictors": predictor_findings(summary) if summary["predictors"] else [],
        "measured": measured_findings(summary["offload"]) if summary.get("offload") else None,
        "simulated": simulated_findings(summary["simulation"]) if summary.get("simulation") else [],
    }
    return out


def sentences(found: dict) -> list[str]:
    """The summary's sentences, in reading order."""
    lines = [found["scope"], *(f["sentence"] for f in found["predictors"])]
    if found["measured"]:
        lines += found["measured"]["sentences"]
    lines += [f["sentence"] for f in found["simulated"]]
    return lines
