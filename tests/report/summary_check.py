"""Reads the report's summary sentences back and checks each against ``summary.json``: every
number they state, which predictor or policy they call best, and the direction of every
claim (better, worse, within the spread), recomputed here from the rows."""

from __future__ import annotations

import html
import re

from specmoe.offload.policy import POLICIES

NUM = r"-?\d[\d,]*(?:\.\d+)?"


def _interval(name: str) -> str:
    return rf"(?P<{name}>{NUM}) (?:\[(?P<{name}_lo>{NUM})–(?P<{name}_hi>{NUM})\]|\(no interval\))"


SCOPE = re.compile(
    rf"Measured: (?P<tokens>{NUM}) tokens of (?P<model>.+) from (?P<documents>{NUM}) documents; "
    r"predictors scored on the test split of the documents\."
)
METRIC = r"recall@k \(k=(?P<k>\d+)(?P<same>, the same as top-1)?\)"
PREDICTOR = re.compile(
    rf"Horizon (?P<h>\d+): (?P<best>\S+) predicts best, {METRIC} {_interval('v')}; "
    rf"runner-up (?P<ru>\S+): {_interval('r')}; (?P<verdict>the intervals overlap, so the data do not separate them"
    r"|the intervals do not overlap: (?P<winner>\S+) is better|without intervals no win is claimed)"
    rf"(?:; chance (?P<chance>{NUM}))?\."
)
ONLY_PREDICTOR = re.compile(
    rf"Horizon (?P<h>\d+): (?P<best>\S+), the only predictor, reaches {METRIC} {_interval('v')}"
    rf"(?:; chance (?P<chance>{NUM}))?\."
)
FIGURES = rf"{_interval('tps')} tokens/s, stall {_interval('stall')} ms/token"
FLOOR = re.compile(
    rf"MEASURED replay, fast tier (?P<tier>\d+)%, batch (?P<batch>\d+), (?P<repeats>\d+) repeats?, "
    rf"median \[min–max\]: on-demand {FIGURES}\."
)
NOISE = "This machine's noise limits these figures: see the notes under MEASURED."
VERDICT = (
    r"(?P<verdict>one repeat, so no spread to judge by: no claim|tokens/s (?P<speed>better than|worse than|"
    r"within the spread of) (?P<against>on-demand|caching), stall (?P<stall_verdict>better than|worse than|"
    r"within the spread of) (?P=against))"
)
AGAINST_FLOOR = re.compile(
    rf"(?P<kind>Caching|Prefetch), (?P<policy>\S+) \(the best of (?P<of>[^)]+) by median tokens/s\): {FIGURES}, "
    rf"(?P<x>{NUM})x on-demand; {VERDICT}\."
)
PREFETCH_VS_CACHE = re.compile(
    rf"Prefetch \((?P<prefetch>\S+)\) against caching \((?P<cache>\S+)\): (?P<x>{NUM})x in tokens/s; {VERDICT}\."
)
SIMULATED = re.compile(
    r"SIMULATION \(cost model, not a measurement\), fast tier (?P<tier>\d+)%, batch (?P<batch>\d+): (?P<parts>.+)\."
)
SIMULATED_PART = re.compile(
    rf"the best (?P<kind>cache|prefetch), (?P<policy>\S+) \(of (?P<of>[^)]+)\), closes (?P<gap>{NUM}|n/a) of the "
    rf"gap from on-demand to the oracle \((?P<x>{NUM})x on-demand\)"
)


def same(stated: str, value) -> None:
    """``stated`` is ``value`` written with as many decimals as ``stated`` has."""
    stated = stated.replace(",", "")
    digits = len(stated.partition(".")[2])
    assert stated == f"{value:.{digits}f}", f"stated {stated}, summary.json has {value}"


def same_interval(match: re.Match, name: str, value: float, ci) -> None:
    same(match[name], value)
    if ci is None:
        assert match[f"{name}_lo"] is None, f"{name}: an interval stated where summary.json has none"
    else:
        same(match[f"{name}_lo"], ci[0])
        same(match[f"{name}_hi"], ci[1])


def expected_direction(a: list[float], b: list[float], higher_is_better: bool) -> str:
    if a[0] > b[1]:
        return "better than" if higher_is_better else "worse than"
    if a[1] < b[0]:
        return "worse than" if higher_is_better else "better than"
    return "within the spread of"


def _label(row: dict) -> str:
    return row["policy"] + (f":{row['predictor']}" if row.get("predictor") else "")


def _kind(row: dict) -> str:
    return POLICIES[row["policy"]].kind


def summary_sentences(page: str) -> list[str]:
    section = re.search(r'<section id="summary">(.*?)</section>', page, re.DOTALL)
    assert section, "the report has no summary section"
    return [
        html.unescape(re.sub(r"<[^>]+>", "", item)).strip()
        for item in re.findall(r"<li>(.*?)</li>", section[1], re.DOTALL)
    ]


def markdown_sentences(text: str) -> list[str]:
    block = text.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in block.splitlines() if line.startswith("- ")]


def _check_predictor(match: re.Match, summary: dict) -> None:
    horizon = int(match["h"])
    rows = {p["label"]: h for p in summary["predictors"] for h in p["horizons"] if h["horizon"] == horizon}
    assert int(match["k"]) == summary["model"]["top_k"] and bool(match["same"]) == (match["k"] == "1")
    best = rows[match["best"]]
    same_interval(match, "v", best["recall_at_k"], best.get("recall_at_k_ci"))
    assert best["recall_at_k"] == max(r["recall_at_k"] for r in rows.values()), f"{match['best']} is not the best"
    if match["chance"] is not None:
        same(match["chance"], summary["chance"]["recall_at_k"])
    if "ru" not in match.groupdict():
        assert len(rows) == 1
        return
    runner_up = rows[match["ru"]]
    same_interval(match, "r", runner_up["recall_at_k"], runner_up.get("recall_at_k_ci"))
    others = [r["recall_at_k"] for label, r in rows.items() if label != match["best"]]
    assert runner_up["recall_at_k"] == max(others) and match["ru"] != match["best"]
    a, b = best.get("recall_at_k_ci"), runner_up.get("recall_at_k_ci")
    if a is None or b is None:
        assert match["verdict"] == "without intervals no win is claimed"
    elif a[0] <= b[1] and b[0] <= a[1]:
        assert match["verdict"].startswith("the intervals overlap"), "a win claimed over an overlapping interval"
    else:
        assert match["winner"] == match["best"], "intervals apart, yet no win stated"


def _measured_rows(summary: dict, batch: int) -> list[dict]:
    return [r for r in summary["offload"]["rows"] if r.get("batch_size", 1) == batch]


def _check_figures(match: re.Match, row: dict) -> None:
    same_interval(match, "tps", row["tokens_per_s"], row["tokens_per_s_range"])
    same_interval(match, "stall", row["stall_ms_per_token"], row["stall_ms_per_token_range"])


def _check_verdict(match: re.Match, a: dict, b: dict, repeats: int) -> None:
    if repeats < 2:
        assert match["verdict"].startswith("one repeat"), "a claim made from one repeat"
        return
    assert match["speed"] == expected_direction(a["tokens_per_s_range"], b["tokens_per_s_range"], True)
    assert match["stall_verdict"] == expected_direction(
        a["stall_ms_per_token_range"], b["stall_ms_per_token_range"], False
    )


def check_sentences(sentences: list[str], summary: dict) -> dict[str, int]:
    """Assert every sentence against ``summary``; returns how many of each kind were read."""
    seen = {"scope": 0, "predictor": 0, "floor": 0, "against_floor": 0, "prefetch_vs_cache": 0, "simulated": 0}
    batch, floor, best = None, None, {}
    for sentence in sentences:
        if match := SCOPE.fullmatch(sentence):
            same(match["tokens"], summary["traces"]["num_tokens"])
            same(match["documents"], summary["traces"]["num_documents"])
            assert match["model"] == summary["model"]["model"]
            seen["scope"] += 1
        elif match := PREDICTOR.fullmatch(sentence) or ONLY_PREDICTOR.fullmatch(sentence):
            _check_predictor(match, summary)
            seen["predictor"] += 1
        elif match := FLOOR.fullmatch(sentence):
            batch, repeats = int(match["batch"]), int(match["repeats"])
            assert batch == min(r.get("batch_size", 1) for r in summary["offload"]["rows"])
            assert repeats == summary["offload"]["repeats"]
            floor = next(r for r in _measured_rows(summary, batch) if r["policy"] == "on-demand")
            same(match["tier"], 100 * floor["cache_fraction"])
            _check_figures(match, floor)
            seen["floor"] += 1
        elif sentence == NOISE:
            assert summary["offload"]["warnings"]
        elif match := AGAINST_FLOOR.fullmatch(sentence):
            kind = "cache" if match["kind"] == "Caching" else "prefetch"
            group = {_label(r): r for r in _measured_rows(summary, batch) if _kind(r) == kind}
            assert match["of"].split(", ") == list(group), "the policies compared are not those of the rows"
            row = group[match["policy"]]
            assert row["tokens_per_s"] == max(r["tokens_per_s"] for r in group.values())
            _check_figures(match, row)
            same(match["x"], row["tokens_per_s"] / floor["tokens_per_s"])
            _check_verdict(match, row, floor, summary["offload"]["repeats"])
            best[kind] = row
            seen["against_floor"] += 1
        elif match := PREFETCH_VS_CACHE.fullmatch(sentence):
            prefetch, cache = best["prefetch"], best["cache"]
            assert (match["prefetch"], match["cache"]) == (_label(prefetch), _label(cache))
            same(match["x"], prefetch["tokens_per_s"] / cache["tokens_per_s"])
            _check_verdict(match, prefetch, cache, summary["offload"]["repeats"])
            seen["prefetch_vs_cache"] += 1
        elif match := SIMULATED.fullmatch(sentence):
            rows = [r for r in summary["simulation"]["rows"] if r.get("batch_size", 1) == int(match["batch"])]
            same(match["tier"], 100 * rows[0]["cache_fraction"])
            for part in match["parts"].split("; "):
                found = SIMULATED_PART.fullmatch(part)
                assert found, f"unreadable: {part!r}"
                group = {_label(r): r for r in rows if _kind(r) == found["kind"]}
                assert found["of"].split(", ") == list(group)
                row = group[found["policy"]]
                assert row["tokens_per_s"] == max(r["tokens_per_s"] for r in group.values())
                same(found["x"], row["speedup_vs_on_demand"])
                if found["gap"] == "n/a":
                    assert row["oracle_gap_closed"] is None
                else:
                    same(found["gap"], row["oracle_gap_closed"])
            seen["simulated"] += 1
        else:
            raise AssertionError(f"a summary sentence no check reads: {sentence!r}")
    return seen
