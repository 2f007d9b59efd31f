"""The report opens with sentences made from summary.json's numbers: they are read back and
checked against summary.json (tests/report/summary_check.py), for the default run shrunk
onto a tiny model and for rows edited to call for each kind of claim."""

import copy
import json

import pytest

from specmoe.report.findings import findings, sentences
from specmoe.report.markdown import markdown_summary
from tests.report.summary_check import check_sentences, markdown_sentences, summary_sentences


@pytest.fixture
def run_summary(finished_run):
    out, _ = finished_run
    return out, json.loads((out / "summary.json").read_text())


def test_the_reports_summary_states_summary_json(run_summary):
    out, summary = run_summary
    stated = summary_sentences((out / "report.html").read_text())
    assert stated == markdown_sentences((out / "summary.md").read_text()) == sentences(summary["findings"])
    seen = check_sentences(stated, summary)
    horizons = {h["horizon"] for p in summary["predictors"] for h in p["horizons"]}
    batches = {r["batch_size"] for r in summary["simulation"]["rows"]}
    assert seen == {
        "scope": 1,
        "predictor": len(horizons),
        "floor": 1,
        "against_floor": 2,  # caching, prefetch
        "prefetch_vs_cache": 1,
        "simulated": len(batches),
    }
    assert all("SIMULATION" in s for s in stated if "oracle" in s and "gap" in s)  # simulated claims are labelled


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["predictors"][0]["horizons"][0].update(
            recall_at_k=s["predictors"][0]["horizons"][0]["recall_at_k"] - 0.01
        ),
        lambda s: s["offload"]["rows"][0].update(tokens_per_s=s["offload"]["rows"][0]["tokens_per_s"] * 1.1),
        lambda s: s["simulation"]["rows"][1].update(oracle_gap_closed=0.9),
        lambda s: s["traces"].update(num_tokens=s["traces"]["num_tokens"] + 1),
    ],
    ids=["predictor", "measured", "simulated", "scope"],
)
def test_a_number_that_differs_from_summary_json_is_caught(run_summary, mutate):
    _, summary = run_summary
    stated = sentences(summary["findings"])
    edited = copy.deepcopy(summary)
    mutate(edited)
    with pytest.raises(AssertionError):
        check_sentences(stated, edited)


def test_an_unsupported_claim_is_caught(run_summary):
    _, summary = run_summary
    stated = sentences(summary["findings"])
    overlap = next(i for i, s in enumerate(stated) if "the intervals overlap" in s)
    best = summary["findings"]["predictors"][0]["best"]["label"]
    stated[overlap] = stated[overlap].replace(
        "the intervals overlap, so the data do not separate them", f"the intervals do not overlap: {best} is better"
    )
    with pytest.raises(AssertionError, match="no win stated|overlapping"):
        check_sentences(stated, summary)


def _with_repeats(summary: dict, floor: tuple, cache: tuple, prefetch: tuple) -> dict:
    """``summary`` with three repeats and the headline rows' ranges set: (tokens/s range,
    stall range) for on-demand, the caches and the prefetchers."""
    edited = copy.deepcopy(summary)
    edited["offload"]["repeats"] = 3
    batch = min(r["batch_size"] for r in edited["offload"]["rows"])
    for row in edited["offload"]["rows"]:
        kind = {"on-demand": floor, "belady": None, "oracle": None, "oracle-prefetch": None}.get(row["policy"], ())
        if kind == ():
            kind = cache if row["policy"] in ("lru", "lfu", "lrfu", "next-use") else prefetch
        if kind is None or row["batch_size"] != batch:
            continue
        (speed_lo, speed_hi), (stall_lo, stall_hi) = kind
        row.update(
            tokens_per_s=(speed_lo + speed_hi) / 2,
            tokens_per_s_range=[speed_lo, speed_hi],
            stall_ms_per_token=(stall_lo + stall_hi) / 2,
            stall_ms_per_token_range=[stall_lo, stall_hi],
        )
    return edited | {"findings": findings(edited)}


@pytest.mark.parametrize(
    ("floor", "cache", "prefetch", "claims"),
    [
        (
            ((10, 12), (5, 6)),
            ((30, 33), (2, 3)),
            ((40, 44), (1, 1.5)),
            ["tokens/s better than on-demand, stall better than on-demand", "tokens/s better than caching"],
        ),
        (
            ((10, 12), (5, 6)),
            ((11, 14), (4, 5.5)),
            ((8, 9), (7, 8)),
            ["tokens/s within the spread of on-demand, stall within the spread of on-demand", "worse than on-demand"],
        ),
    ],
    ids=["apart", "overlapping"],
)
def test_measured_claims_follow_the_spread_of_repeats(run_summary, floor, cache, prefetch, claims):
    _, summary = run_summary
    edited = _with_repeats(summary, floor, cache, prefetch)
    stated = markdown_sentences(markdown_summary(edited))
    check_sentences(stated, edited)
    for claim in claims:
        assert any(claim in s for s in stated), claim


def test_predictor_claims_follow_the_intervals(run_summary):
    _, summary = run_summary
    edited = copy.deepcopy(summary)
    for rank, predictor in enumerate(edited["predictors"]):  # spread the predictors apart
        for h in predictor["horizons"]:
            value = 0.9 - 0.1 * rank
            h.update(recall_at_k=value, recall_at_k_ci=[value - 0.02, value + 0.02])
    edited["findings"] = findings(edited)
    stated = sentences(edited["findings"])
    check_sentences(stated, edited)
    assert f"do not overlap: {edited['predictors'][0]['label']} is better" in stated[1]
