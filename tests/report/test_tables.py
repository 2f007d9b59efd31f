"""The report's tables, plots and model card show what was used, once, legibly."""

import copy
import json
import re

from specmoe.report import plots
from specmoe.report.card import card_rows, model_card
from specmoe.report.markdown import markdown_summary
from specmoe.report.tables import command_block, predictor_table


def test_with_one_expert_per_token_top1_and_recall_share_one_column(finished_run):
    out, _ = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert "<th>top-1 h=1</th><th>recall@k h=1</th>" in predictor_table(summary)
    top1 = copy.deepcopy(summary)
    top1["model"]["top_k"] = 1
    table = predictor_table(top1)
    assert "<th>top-1 = recall@k h=1</th>" in table and "<th>top-1 h=1</th>" not in table
    assert "| top-1 = recall@k h=1 |" in markdown_summary(top1)


def test_the_config_block_shows_the_values_the_stages_used(finished_run):
    out, _ = finished_run
    page = (out / "report.html").read_text()
    config = page[page.index("config.yaml</code> in the run directory") :]
    simulation = json.loads((out / "simulation" / "simulation.json").read_text())
    assert f"expert_bytes: {simulation['expert_bytes']}  # resolved" in config
    assert f"compute_ms: {simulation['hardware']['compute_s_per_layer'] * 1e3:g}  # resolved" in config
    assert "expert_bytes: null" not in config and "compute_ms: null" not in config


def test_the_simulation_table_shows_the_batch_sizes_of_its_plot(finished_run):
    out, _ = finished_run
    page = (out / "report.html").read_text()
    section = page[page.index("SIMULATION at a") : page.index('<span class="label measured">')]
    header = re.findall(r"<th>(.*?)</th>", section)
    batch_column = header.index("batch")
    rows = re.findall(r"<tr>(<td>.*?)</tr>", section)
    shown = {re.findall(r"<td>(.*?)</td>", row)[batch_column] for row in rows}
    simulation = json.loads((out / "simulation" / "simulation.json").read_text())
    plotted = {str(r["batch_size"]) for r in simulation["rows"]}
    assert shown == plotted and len(plotted) > 1
    assert f"batch {' and '.join(sorted(plotted))}" in section


def test_lines_of_the_recall_plots_stay_apart(finished_run):
    out, _ = finished_run
    metrics = {path.stem: json.loads(path.read_text()) for path in (out / "metrics").glob("*.json")}
    for axis in ("horizon", "layer"):
        lines = [line for line in plots.accuracy_by(metrics, axis).axes[0].get_lines() if line.get_label() in metrics]
        assert len(lines) == len(metrics) > 1
        styles = {(line.get_marker(), line.get_linestyle(), line.get_markerfacecolor()) for line in lines}
        assert len(styles) == len(lines)
        assert len({tuple(line.get_xdata()) for line in lines}) == len(lines)  # shifted sideways too


def test_commands_wrap_between_words_only():
    block = command_block("specmoe collect --model a<b --out /very/long-path")
    assert block.count('<span class="word">') == 6 and "a&lt;b" in block


def test_the_card_of_a_builtin_model_says_what_it_is_and_stands_in_for():
    card = model_card("switch-128e", {"model_type": "switch_transformers", "num_experts": 128, "top_k": 1})
    rows = dict(card_rows(card))
    assert rows["parameters"].startswith("17.0M")  # docs/models.md: 17.0M
    assert "T5 span corruption" in rows["trained"] and "train-builtin switch-128e" in rows["trained"]
    assert "Switch-base-128" in rows["stands in for"]
    assert rows["layers"].startswith("12 encoder + 2 decoder")


def test_the_card_of_a_model_not_here_says_what_is_unknown():
    rows = dict(card_rows(model_card("nobody/no-such-model", {"model_type": "olmoe", "num_experts": 8, "top_k": 2})))
    assert rows["parameters"].startswith("unknown") and "by its authors" in rows["trained"]
    assert "stands in for" not in rows
