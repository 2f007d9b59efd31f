"""``report.html`` (one self-contained file: plots inlined as PNG) and ``summary.md`` for a run
directory. ``specmoe report RUN_DIR`` re-renders them without rerunning anything."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from specmoe.report import plots
from specmoe.report.results import HEADLINE_FRACTION, load_run, with_spread
from specmoe.storage import atomic

_OFFLOAD_COLUMNS = (
    ("policy", lambda r: plots.policy_label(r)),
    ("fast tier", lambda r: f"{100 * r['cache_fraction']:.0f}%"),
    ("batch", lambda r: r.get("batch_size", 1)),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.1f}" + _range(r.get("tokens_per_s_range"), 1)),
    (
        "stall ms/token",
        lambda r: (
            f"{r['stall_ms_per_token']:.2f}" + _range(r.get("stall_ms_per_token_range"), 2)
            if "stall_ms_per_token" in r
            else ""
        ),
    ),
    ("hit rate", lambda r: f"{r['hit_rate']:.3f}"),
    ("stall", lambda r: f"{r['stall_fraction']:.3f}"),
)


def _range(values, digits: int) -> str:
    """`` [lo-hi]``: the spread of a measured figure's repeats."""
    return "" if not values else f" [{values[0]:.{digits}f}-{values[1]:.{digits}f}]"


def _figures(run: dict) -> dict[str, bytes]:
    figures = {}
    if run["traces"]:
        figures["usage"] = plots.png_bytes(plots.usage_heatmap(run["traces"]))
    if run["metrics"]:
        figures["comparison"] = plots.png_bytes(plots.predictor_comparison(run["metrics"]))
        figures["by_horizon"] = plots.png_bytes(plots.accuracy_by(run["metrics"], "horizon"))
        figures["by_layer"] = plots.png_bytes(plots.accuracy_by(run["metrics"], "layer"))
        figures["calibration"] = plots.png_bytes(plots.calibration(run["metrics"]))
    if run["simulation"]:
        figures["simulated"] = plots.png_bytes(plots.simulated_speed(run["simulation"]))
    if run["offload"]:
        figures["measured"] = plots.png_bytes(plots.measured_speed(run["offload"]))
        fraction = min({r["cache_fraction"] for r in run["offload"]["rows"]}, key=lambda f: abs(f - HEADLINE_FRACTION))
        figures["stalls"] = plots.png_bytes(
            plots.stall_breakdown(run["offload"]["rows"], fraction, f"MEASURED, fast tier {100 * fraction:.0f}%")
        )
    return figures


def _offload_table(rows: list[dict], simulated: bool) -> Markup:
    extra = ("of oracle gap closed", "oracle_gap_closed") if simulated else ("of oracle tokens/s", "fraction_of_oracle")
    head = "".join(f"<th>{name}</th>" for name, _ in _OFFLOAD_COLUMNS) + f"<th>{extra[0]}</th>"
    body = []
    for r in rows:
        cells = "".join(f"<td>{html.escape(str(fn(r)))}</td>" for _, fn in _OFFLOAD_COLUMNS)
        value = r.get(extra[1])
        cells += f"<td>{'' if value is None else f'{value:.3f}'}</td>"
        body.append(f"<tr>{cells}</tr>")
    return Markup(f"<table><thead><tr>{head}</tr></thead>{''.join(body)}</table>")


def _stage_commands(run: dict) -> list[str]:
    """The single commands that redo each stage, in pipeline order."""
    return [record["command"] for record in run["stages"].values() if record.get("command")]


def write_report(run_dir: str | Path) -> Path:
    run = load_run(run_dir)
    run_dir = Path(run_dir)
    figures = _figures(run)
    for name, folder in (("simulated", "simulation"), ("measured", "offload")):
        if name in figures:  # also as files, for slides and READMEs
            atomic.write_bytes(run_dir / folder / "speed_vs_memory.png", figures[name])

    def figure(key: str, caption: str) -> Markup:
        if key not in figures:
            return Markup("")
        data = base64.b64encode(figures[key]).decode()
        return Markup(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    summary = run["summary"]
    env = Environment(loader=PackageLoader("specmoe.report"), autoescape=select_autoescape(), undefined=StrictUndefined)
    simulation, offload = run["simulation"], run["offload"]
    page = env.get_template("report.html.j2").render(
        summary=summary,
        model=summary["model"],
        generated=datetime.datetime.now().isoformat(timespec="seconds"),
        layer_stats=next(iter(run["traces"]["statistics"].values()))["layers"],
        horizons=range(1, run["config"]["predictors"]["horizons"] + 1),
        simulation=simulation,
        simulation_rows=[r for r in simulation["rows"] if r["batch_size"] == 1] if simulation else [],
        offload=offload,
        offload_rows=with_spread(offload["rows"]) if offload else [],
        offload_warnings=summary.get("offload", {}).get("warnings", []),
        commands=_stage_commands(run),
        config_yaml=yaml.safe_dump(run["config"], sort_keys=False),
        figure=figure,
        table=_offload_table,
    )
    atomic.write_text(run_dir / "report.html", page)
    atomic.write_text(run_dir / "summary.md", markdown_summary(summary))
    return run_dir / "report.html"


def markdown_summary(summary: dict) -> str:
    model, traces = summary["model"], summary["traces"]
    lines = [
        f"# specmoe run: {model['model']}",
        "",
        (
            f"{traces['num_tokens']:,} tokens from {traces['num_documents']} documents; {model['num_layers']} MoE "
            f"layers x {model['num_experts']} experts, top-{model['top_k']}. Test split of the document split with "
            f"seed {summary['split_seed']}. Command: `{summary['command']}`."
        ),
        "",
        "## Predictors (test split, pooled over layers; 95% bootstrap interval over documents)",
        "",
    ]
    horizons = [h["horizon"] for h in summary["predictors"][0]["horizons"]] if summary["predictors"] else []
    lines.append(
        "| predictor | " + " | ".join(f"top-1 h={h} | recall@k h={h}" for h in horizons) + " | µs/token/layer |"
    )
    lines.append("|---|" + "---:|---:|" * len(horizons) + "---:|")
    for p in summary["predictors"]:
        cells = []
        for h in p["horizons"]:
            ci = h.get("recall_at_k_ci")
            cells += [
                f"{h['top1_acc']:.3f}",
                f"{h['recall_at_k']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
            ]
        lines.append(f"| {p['label']} | " + " | ".join(cells) + f" | {p['latency_us_per_token_layer']} |")
    if summary["chance"]:
        chance = summary["chance"]
        lines.append(
            "| *chance* | "
            + " | ".join(f"{chance['top1_acc']:.4f} | {chance['recall_at_k']:.4f}" for _ in horizons)
            + " | |"
        )
    for key, heading, value_key in (
        ("simulation", "Offloading, SIMULATION (cost model), batch 1", "oracle_gap_closed"),
        (
            "offload",
            "Offloading, MEASURED replay (recorded routing, random experts of a real shape, disk)",
            "fraction_of_oracle",
        ),
    ):
        if key not in summary:
            continue
        rows = summary[key]["rows"]
        measured = key == "offload"
        lines += [
            "",
            f"## {heading}, fast tier {100 * rows[0]['cache_fraction']:.0f}%",
            "",
        ]
        if measured:
            lines += [f"Median of {summary[key]['repeats']} repeats, [slowest-fastest].", ""]
            lines += [f"**Note:** {warning}" for warning in summary[key]["warnings"]]
            lines += [""] if summary[key]["warnings"] else []
        lines += [
            f"| policy | tokens/s | {'stall ms/token | ' if measured else ''}hit rate | stall | "
            f"{value_key.replace('_', ' ')} |",
            "|---|---:|" + ("---:|" if measured else "") + "---:|---:|---:|",
        ]
        for r in rows:
            value = r.get(value_key)
            speed = f"{r['tokens_per_s']:.1f}" + _range(r.get("tokens_per_s_range"), 1)
            stall = f"{r['stall_ms_per_token']:.2f}{_range(r['stall_ms_per_token_range'], 2)} | " if measured else ""
            lines.append(
                f"| {plots.policy_label(r)} | {speed} | {stall}{r['hit_rate']:.3f} | "
                f"{r['stall_fraction']:.3f} | {'' if value is None else f'{value:.3f}'} |"
            )
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items()), ""]
    return "\n".join(lines)
