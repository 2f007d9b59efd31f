"""`specmoe train`, `evaluate`, `predictors list` and `bench predictors` end to end on a
synthetic store with planted structure."""

import json

import pytest
from typer.testing import CliRunner

from specmoe.cli import app
from tests.predictors.synthetic import make_synthetic_store

runner = CliRunner()


def test_train_then_evaluate(tmp_path):
    traces = tmp_path / "traces"
    make_synthetic_store(traces, noise=0.05)
    result = runner.invoke(
        app, ["train", "--predictor", "ngram", "--traces", str(traces), "--out", str(tmp_path / "p")]
    )
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "p" / "train_info.json").read_text())
    assert info["val_recall_at_k"] > 0.8 and info["command"]
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--predictor-dir",
            str(tmp_path / "p"),
            "--traces",
            str(traces),
            "--bootstrap",
            "100",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    required = {"predictor", "horizon", "layer", "top1_acc", "hit1", "recall_at_k", "recall_at_2k", "n_tokens"}
    assert all(required <= set(r) for r in rows)
    assert {r["horizon"] for r in rows} == {1, 2, 3}
    overall = next(r for r in rows if r["horizon"] == 1 and r["layer"] == "all")
    assert overall["top1_acc"] > 0.85 and overall["split"] == "test"
    assert report["cost"]["latency_us_per_token_layer"] > 0


def test_bad_predictor_name_and_param_are_one_line_errors(tmp_path):
    traces = tmp_path / "traces"
    make_synthetic_store(traces)
    result = runner.invoke(app, ["train", "--predictor", "nope", "--traces", str(traces), "--out", str(tmp_path / "p")])
    assert result.exit_code != 0 and "unknown predictor 'nope'" in str(result.exception)
    result = runner.invoke(
        app,
        ["train", "--predictor", "ngram", "--traces", str(traces), "--out", str(tmp_path / "p"), "--param", "bogus=1"],
    )
    assert "bad parameters" in str(result.exception)


def test_predictors_list_counts_parameters():
    result = runner.invoke(app, ["predictors", "list"])
    assert result.exit_code == 0
    assert "interlayer:baseline" in result.output and "multiscale:small" in result.output


def test_bench_predictors_writes_json_and_markdown(tmp_path):
    traces = tmp_path / "traces"
    make_synthetic_store(traces, noise=0.05)
    out = tmp_path / "bench.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "predictors",
            "--traces",
            str(traces),
            "--json",
            str(out),
            "--bootstrap",
            "50",
            "--predictor",
            "popularity",
            "--predictor",
            "transition",
            "--predictor",
            "lookahead",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [r["predictor"] for r in report["results"]]
    assert names == ["popularity", "transition", "lookahead"]
    assert "skipped" in report["results"][2]  # the synthetic store has no hidden states
    table = out.with_suffix(".md").read_text()
    assert "| transition |" in table and "*chance*" in table


@pytest.mark.parametrize("model_type", ["olmoe", "switch_transformers"])
def test_serve_generates_with_offloaded_experts(tiny_checkpoints, model_type):
    result = runner.invoke(
        app,
        [
            "serve",
            "--model",
            str(tiny_checkpoints[model_type]),
            "--prompt",
            "The quick brown",
            "--fast-tier",
            "0.05MiB",
            "--max-new-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output.strip().splitlines()[-1])
    assert stats["tokens"] == 4 and stats["misses"] > 0 and stats["peak_bytes"] <= 0.05 * 2**20


def test_serve_runs_the_policy_it_is_given_and_names_the_policies_when_it_does_not_know_one(tiny_checkpoints):
    base = ["serve", "--model", str(tiny_checkpoints["olmoe"]), "--prompt", "The quick", "--fast-tier", "0.05MiB"]
    result = runner.invoke(app, [*base, "--max-new-tokens", "2", "--policy", "lfu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["tokens"] == 2
    wrong = runner.invoke(app, [*base, "--policy", "lru-ish"])
    assert wrong.exit_code != 0 and "unknown offload policy 'lru-ish'" in str(wrong.exception)
    assert "cost-aware+recurrence" in str(wrong.exception)
    needs = runner.invoke(app, [*base, "--policy", "cost-aware+recurrence"])
    assert needs.exit_code != 0 and "needs a predictor" in str(needs.exception)
