"""The report's tables as HTML, and the run's configuration as it was resolved."""

from __future__ import annotations

import copy
import html
import re

import yaml
from markupsafe import Markup

from specmoe.report.plots import policy_label


def spread(values, digits: int) -> str:
    """`` [lo–hi]``: the spread of a measured figure's repeats."""
    return "" if not values else f" [{values[0]:.{digits}f}–{values[1]:.{digits}f}]"


def _optional(value, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


OFFLOAD_COLUMNS = (
    ("policy", policy_label),
    ("fast tier", lambda r: f"{100 * r['cache_fraction']:.0f}%"),
    ("batch", lambda r: r.get("batch_size", 1)),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:.1f}" + spread(r.get("tokens_per_s_range"), 1)),
    (
        "stall ms/token",
        lambda r: _optional(r.get("stall_ms_per_token"), "{:.2f}") + spread(r.get("stall_ms_per_token_range"), 2),
    ),
    ("stall share", lambda r: f"{100 * r['stall_fraction']:.1f}%"),
    ("hit rate", lambda r: f"{r['hit_rate']:.3f}"),
    ("x on-demand", lambda r: _optional(r.get("speedup_vs_on_demand"), "{:.2f}")),
)


SIMULATED_EXTRA = ("oracle_gap_closed", "of oracle gap closed")
MEASURED_EXTRA = ("fraction_of_oracle", "of oracle tokens/s")
"""The last column of an offload table: (key, heading)."""


def offload_table(rows: list[dict], simulated: bool) -> Markup:
    key, heading = SIMULATED_EXTRA if simulated else MEASURED_EXTRA
    columns = (*OFFLOAD_COLUMNS, (heading, lambda r: _optional(r.get(key), "{:.3f}")))
    head = "".join(f"<th>{name}</th>" for name, _ in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(fn(r)))}</td>" for _, fn in columns) + "</tr>" for r in rows)
    return Markup(f"<table><thead><tr>{head}</tr></thead>{body}</table>")


def predictor_columns(top_k: int) -> list[tuple[str, str]]:
    """(metric key, heading) per horizon: top-1 and recall@k, one column when k = 1 (equal)."""
    if top_k == 1:
        return [("recall_at_k", "top-1 = recall@k")]
    return [("top1_acc", "top-1"), ("recall_at_k", "recall@k")]


def _with_interval(value: float, ci, digits: int = 3) -> str:
    text = html.escape(f"{value:.{digits}f}")
    if ci:
        text += f' <span class="ci">[{ci[0]:.{digits}f}–{ci[1]:.{digits}f}]</span>'
    return text


def predictor_table(summary: dict) -> Markup:
    columns = predictor_columns(summary["model"]["top_k"])
    horizons = [h["horizon"] for h in summary["predictors"][0]["horizons"]] if summary["predictors"] else []
    head = "<th>predictor</th>" + "".join(f"<th>{name} h={h}</th>" for h in horizons for _, name in columns)
    head += "<th>ECE h=1</th><th>params</th><th>µs / token / layer</th><th>of model time</th><th>fit (s)</th>"
    body = []
    for p in summary["predictors"]:
        cells = [f"<td>{html.escape(p['label'])}</td>"]
        cells += [f"<td>{_with_interval(h[key], h.get(f'{key}_ci'))}</td>" for h in p["horizons"] for key, _ in columns]
        share = p["fraction_of_model_time"]
        cells += [
            f"<td>{_optional(p['ece_h1'], '{:.3f}')}</td>",
            f"<td>{p['params']:,}</td>",
            f"<td>{p['latency_us_per_token_layer']}</td>",
            f"<td>{'n/a' if share is None else f'{100 * share:.1f}%'}</td>",
            f"<td>{_optional(p['fit_seconds'], '{}')}</td>",
        ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    chance = summary["chance"]
    if chance:
        cells = "".join(f"<td>{chance[key]:.4f}</td>" for _ in horizons for key, _ in columns)
        body.append(f'<tr><td><i>chance</i></td>{cells}<td colspan="5"></td></tr>')
    return Markup(f"<table><thead><tr>{head}</tr></thead>{''.join(body)}</table>")


def resolved_config(config: dict, simulation: dict | None, offload: dict | None) -> str:
    """``config.yaml`` with the values the stages resolved in place of its nulls (expert
    bytes, the link, compute per layer, expert shape, prefetch widths), each marked."""
    config, filled = copy.deepcopy(config), set()

    def fill(path: tuple[str, ...], value) -> None:
        *parents, leaf = path
        node = config
        for key in parents:
            node = node.get(key) or {}
        if leaf in node and node[leaf] is None and value is not None:
            node[leaf] = value
            filled.add(path)

    if simulation:
        hardware = simulation["hardware"]
        fill(("simulate", "expert_bytes"), simulation["expert_bytes"])
        fill(("simulate", "bandwidth_gbps"), hardware["bandwidth_bytes_per_s"] / 1e9)
        fill(("simulate", "latency_us"), round(hardware["latency_s"] * 1e6, 3))
        fill(("simulate", "compute_ms"), round(hardware["compute_s_per_layer"] * 1e3, 4))
        for key, value in simulation.get("prefetch", {}).items():
            fill(("simulate", "prefetch", key), value)
    if offload:
        fill(("offload", "expert_shape"), [offload["expert_shape"]["hidden"], offload["expert_shape"]["ffn"]])
        for key, value in offload.get("prefetch", {}).items():
            fill(("offload", "prefetch", key), value)
    lines, path = [], []
    for line in yaml.safe_dump(config, sort_keys=False).splitlines():
        match = re.match(r"( *)([\w.]+):", line)
        if match:
            depth = len(match.group(1)) // 2
            path[depth:] = [match.group(2)]
            if tuple(path) in filled:
                line += "  # resolved (null in the config)"
        lines.append(line)
    return "\n".join(lines) + "\n"


def command_block(command: str) -> Markup:
    """A shell command that wraps between its words only."""
    words = " ".join(f'<span class="word">{html.escape(word)}</span>' for word in command.split(" "))
    return Markup(f'<span class="command">{words}</span>')
