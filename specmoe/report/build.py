"""``report.html`` (one self-contained file: plots inlined as PNG) and ``summary.md`` for a run
directory. ``specmoe report RUN_DIR`` re-renders them without rerunning anything."""

from __future__ import annotations

import base64
import datetime
import html
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from specmoe.errors import InputError
from specmoe.report import plots, tables
from specmoe.report.card import card_rows
from specmoe.report.findings import sentences
from specmoe.report.glossary import GLOSSARY
from specmoe.report.markdown import markdown_summary
from specmoe.report.results import headline_fraction, load_run, summarize, with_spread
from specmoe.storage import atomic


def _figures(run: dict) -> dict[str, bytes]:
    figures = {}
    if run["traces"]:
        figures["usage"] = plots.png_bytes(plots.usage_heatmap(run["traces"]))
    if run["metrics"]:
        figures["comparison"] = plots.png_bytes(plots.predictor_comparison(run["metrics"], run["traces"]["top_k"]))
        figures["by_horizon"] = plots.png_bytes(plots.accuracy_by(run["metrics"], "horizon"))
        figures["by_layer"] = plots.png_bytes(plots.accuracy_by(run["metrics"], "layer"))
        figures["calibration"] = plots.png_bytes(plots.calibration(run["metrics"]))
    if run["simulation"]:
        figures["simulated"] = plots.png_bytes(plots.simulated_speed(run["simulation"]))
    if run["offload"]:
        figures["measured"] = plots.png_bytes(plots.measured_speed(run["offload"]))
        fraction = headline_fraction(run["offload"]["rows"])
        figures["stalls"] = plots.png_bytes(
            plots.stall_breakdown(run["offload"]["rows"], fraction, f"MEASURED, fast tier {100 * fraction:.0f}%")
        )
    return figures


def _stage_commands(run: dict) -> list[str]:
    """The single commands that redo each stage, in pipeline order."""
    return [record["command"] for record in run["stages"].values() if record.get("command")]


def write_report(run_dir: str | Path, *, command: str | None = None, seconds: float | None = None) -> Path:
    """Write ``summary.json`` afresh from the stage outputs, then ``report.html`` and
    ``summary.md`` from it. ``command`` and ``seconds`` (the ``specmoe run`` that wrote the
    run) default to those an earlier summary recorded."""
    run = load_run(run_dir)
    run_dir = Path(run_dir)
    if run["traces"] is None:
        raise InputError(f"{run_dir}: the run has not described its traces yet; finish it with `specmoe run` first")
    previous = run["summary"] or {}
    summary = summarize(
        run,
        command=previous.get("command", "") if command is None else command,
        seconds=previous.get("seconds_this_invocation", 0.0) if seconds is None else seconds,
    )
    atomic.write_json(run_dir / "summary.json", summary)
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

    env = Environment(loader=PackageLoader("specmoe.report"), autoescape=select_autoescape(), undefined=StrictUndefined)
    simulation, offload = run["simulation"], run["offload"]
    simulation_rows = []
    if simulation:
        fraction = headline_fraction(simulation["rows"])
        simulation_rows = [r for r in simulation["rows"] if r["cache_fraction"] == fraction]
    page = env.get_template("report.html.j2").render(
        summary=summary,
        model=summary["model"],
        sentences=sentences(summary["findings"]),
        card=card_rows(summary["model_card"]),
        glossary=GLOSSARY,
        generated=datetime.datetime.now().isoformat(timespec="seconds"),
        layer_stats=next(iter(run["traces"]["statistics"].values()))["layers"],
        predictor_table=tables.predictor_table(summary),
        simulation=simulation,
        simulation_rows=simulation_rows,
        simulation_batches=sorted({r["batch_size"] for r in simulation_rows}),
        offload=offload,
        offload_rows=with_spread(offload["rows"]) if offload else [],
        offload_warnings=summary.get("offload", {}).get("warnings", []),
        commands=_stage_commands(run),
        config_yaml=tables.resolved_config(run["config"], simulation, offload),
        human_bytes=plots.human_bytes,
        command_block=tables.command_block,
        figure=figure,
        table=tables.offload_table,
    )
    atomic.write_text(run_dir / "report.html", page)
    atomic.write_text(run_dir / "summary.md", markdown_summary(summary))
    return run_dir / "report.html"
