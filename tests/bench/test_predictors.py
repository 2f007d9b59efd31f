"""``specmoe bench predictors`` resumes an interrupted run without refitting what finished."""

import pytest

from specmoe.bench import predictors as bench


def test_an_interrupted_predictor_benchmark_resumes_where_it_stopped(finished_run, tmp_path, monkeypatch):
    out, _ = finished_run
    progress = tmp_path / "predictors.json.partial.jsonl"
    real_evaluate, scored = bench.evaluate, []

    def evaluate(predictor, *args, **kwargs):
        if scored:  # the second predictor: the process is killed
            raise KeyboardInterrupt
        scored.append(predictor.name)
        return real_evaluate(predictor, *args, **kwargs)

    monkeypatch.setattr(bench, "evaluate", evaluate)
    kwargs = {"specs": ("popularity", "transition"), "bootstrap": 10, "progress": False, "progress_file": progress}
    with pytest.raises(KeyboardInterrupt):
        bench.benchmark_predictors(out / "traces", **kwargs)
    monkeypatch.setattr(bench, "evaluate", lambda p, *a, **k: (scored.append(p.name), real_evaluate(p, *a, **k))[1])
    report = bench.benchmark_predictors(out / "traces", **kwargs)
    assert scored == ["popularity", "transition"], "the finished predictor was scored again"
    assert [r["predictor"] for r in report["results"]] == ["popularity", "transition"]
    assert progress.exists(), "removed before the caller saved the report"


def test_cross_token_predictors_get_a_table_of_their_own(finished_run):
    out, _ = finished_run
    report = bench.benchmark_predictors(
        out / "traces", specs=("lookahead", "next-token-table"), bootstrap=10, progress=False
    )
    crossing = report["results"][1]["rows"]
    assert all(r["crosses_token"] for r in crossing)
    assert {r["source_layer"] for r in crossing} == {0, 1}  # the tiny model's two layers, reach 3
    table = bench.markdown_table(report)
    assert "Across the token boundary" in table and "| next-token-table | 1 | 0 | 1 |" in table
    assert "| lookahead |" in table.split("Across")[0] and "| next-token-table |" not in table.split("Across")[0]
