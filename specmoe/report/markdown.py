"""``summary.md``: the report's summary, model card, tables and glossary as Markdown, from
``summary.json`` alone."""

from __future__ import annotations

from specmoe.report.card import card_rows
from specmoe.report.findings import sentences
from specmoe.report.glossary import GLOSSARY
from specmoe.report.plots import policy_label
from specmoe.report.tables import MEASURED_EXTRA, SIMULATED_EXTRA, predictor_columns, spread


def _interval(value: float, ci) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "")


def _predictor_table(summary: dict) -> list[str]:
    columns = predictor_columns(summary["model"]["top_k"])
    horizons = [h["horizon"] for h in summary["predictors"][0]["horizons"]] if summary["predictors"] else []
    lines = [
        "| predictor | " + " | ".join(f"{name} h={h}" for h in horizons for _, name in columns) + " | µs/token/layer |",
        "|---|" + "---:|" * (len(horizons) * len(columns)) + "---:|",
    ]
    for p in summary["predictors"]:
        cells = [_interval(h[key], h.get(f"{key}_ci")) for h in p["horizons"] for key, _ in columns]
        lines.append(f"| {p['label']} | " + " | ".join(cells) + f" | {p['latency_us_per_token_layer']} |")
    if summary["chance"]:
        cells = [f"{summary['chance'][key]:.4f}" for _ in horizons for key, _ in columns]
        lines.append("| *chance* | " + " | ".join(cells) + " | |")
    return lines


def _offload_tables(summary: dict) -> list[str]:
    lines = []
    for key, heading, (value_key, value_name) in (
        ("simulation", "Offloading, SIMULATION (cost model, not a measurement)", SIMULATED_EXTRA),
        (
            "offload",
            "Offloading, MEASURED replay (recorded routing, random experts of a real shape, disk)",
            MEASURED_EXTRA,
        ),
    ):
        if key not in summary:
            continue
        rows = summary[key]["rows"]
        measured = key == "offload"
        batches = " and ".join(str(b) for b in sorted({r.get("batch_size", 1) for r in rows}))
        lines += ["", f"## {heading}, fast tier {100 * rows[0]['cache_fraction']:.0f}%, batch {batches}", ""]
        if measured:
            lines += [f"Median of {summary[key]['repeats']} run(s) per row, [min–max].", ""]
            lines += [f"**Note:** {warning}" for warning in summary[key]["warnings"]]
            lines += [""] if summary[key]["warnings"] else []
        lines += [
            f"| policy | batch | tokens/s | stall ms/token | stall share | hit rate | {value_name} |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            value = r.get(value_key)
            stall = "" if r.get("stall_ms_per_token") is None else f"{r['stall_ms_per_token']:.2f}"
            lines.append(
                f"| {policy_label(r)} | {r.get('batch_size', 1)} | {r['tokens_per_s']:.1f}"
                f"{spread(r.get('tokens_per_s_range'), 1)} | {stall}{spread(r.get('stall_ms_per_token_range'), 2)} | "
                f"{100 * r['stall_fraction']:.1f}% | {r['hit_rate']:.3f} | {'' if value is None else f'{value:.3f}'} |"
            )
    return lines


def markdown_summary(summary: dict) -> str:
    model, traces = summary["model"], summary["traces"]
    lines = [
        f"# specmoe run: {model['model']}",
        "",
        "## Summary",
        "",
        *(f"- {sentence}" for sentence in sentences(summary["findings"])),
        "",
        "## Model",
        "",
        *(f"- **{field}:** {text}" for field, text in card_rows(summary["model_card"])),
        "",
        (
            f"{traces['num_tokens']:,} tokens from {traces['num_documents']} documents; {model['num_layers']} MoE "
            f"layers x {model['num_experts']} experts, top-{model['top_k']}. Test split of the document split with "
            f"seed {summary['split_seed']}. Command: `{summary['command']}`."
        ),
        "",
        "## Predictors (test split, pooled over layers; 95% bootstrap interval over documents)",
        "",
        *_predictor_table(summary),
        *_offload_tables(summary),
        "",
        "## Glossary",
        "",
        *(f"- **{term}:** {text}" for _, terms in GLOSSARY for term, text in terms),
        "",
        "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()),
        "",
    ]
    return "\n".join(lines)
