"""``specmoe bench predictor-cost``: measured CPU time and counted FLOPs beside real models."""

from specmoe.bench.predictor_cost import benchmark_predictor_cost, markdown_table


def test_cost_rows_measure_both_batch_sizes_and_count_against_each_model(finished_run):
    out, _ = finished_run
    dirs = [out / "predictors" / "lookahead", out / "predictors" / "token"]
    report = benchmark_predictor_cost(
        out / "traces", dirs, models=("mistralai/Mixtral-8x7B-v0.1",), batch_sizes=(1, 4), rounds=2
    )
    lookahead, token = report["rows"]
    for row in report["rows"]:
        assert set(row["measured_us_per_token_call"]) == {1, 4}
        assert row["measured_us_per_token_call"][1]["median"] > 0
    mixtral = lookahead["models"][1]
    assert mixtral["model"] == "mistralai/Mixtral-8x7B-v0.1" and mixtral["calls_per_token"] == 31
    assert mixtral["flops_per_call"] == 3 * (2 * 4096 * 8 + 4 * 4096)  # three horizons of an 8-expert router
    assert token["models"][1]["flops_per_call"] < mixtral["flops_per_call"]
    assert "| lookahead |" in markdown_table(report)
