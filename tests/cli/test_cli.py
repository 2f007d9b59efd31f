"""The command line: help, listing, and one-line errors for bad input."""

import json

from typer.testing import CliRunner

from specmoe.cli import app
from specmoe.errors import InputError, UnsupportedModelError
from specmoe.models.loading import load_model

runner = CliRunner()


def test_models_list_names_every_family_and_builtin():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    for name in ("switch_transformers", "deepseek_v3", "llama4_text", "switch-128e", "olmoe-64e", "mixtral-32e"):
        assert name in result.output


def test_collect_help_documents_options():
    result = runner.invoke(app, ["collect", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0
    for option in ("--model", "--text", "--out", "--max-tokens", "--seq-len", "--batch-size", "--save-router-inputs"):
        assert option in result.output


def test_unknown_model_is_a_clear_error(tmp_path):
    try:
        load_model(str(tmp_path / "no-such-model"))
    except InputError as exc:
        assert "no-such-model" in str(exc) and "Built-in models" in str(exc)
    else:
        raise AssertionError("expected InputError")


def test_unsupported_local_checkpoint_lists_supported_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    try:
        load_model(str(tmp_path))
    except UnsupportedModelError as exc:
        assert "'llama'" in str(exc) and "mixtral" in str(exc)
    else:
        raise AssertionError("expected UnsupportedModelError")


def test_collect_cli_end_to_end(tiny_checkpoints, small_corpus, tmp_path):
    out = tmp_path / "t"
    result = runner.invoke(
        app,
        [
            "collect",
            "--model",
            str(tiny_checkpoints["olmoe"]),
            "--text",
            str(small_corpus),
            "--out",
            str(out),
            "--seq-len",
            "16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "from 6 documents" in result.output
    verify = runner.invoke(app, ["traces", "verify", str(out)])
    assert verify.exit_code == 0 and verify.output.startswith("ok:")


def test_malformed_list_options_are_clear_errors(tmp_path):
    for option, value, expected in (
        ("--expert-shape", "768", "--expert-shape expects 2 comma-separated values, got '768'"),
        ("--cache-fractions", "0.1,abc", "--cache-fractions expects comma-separated floats, got '0.1,abc'"),
    ):
        args = ["bench", "offload", "--traces", str(tmp_path), "--json", str(tmp_path / "o.json"), option, value]
        result = runner.invoke(app, args)
        assert isinstance(result.exception, InputError), result.output
        assert str(result.exception) == expected


def test_bench_offload_writes_its_report_then_drops_its_finished_runs(finished_run, tmp_path):
    out, _ = finished_run
    report = tmp_path / "o.json"
    args = ["bench", "offload", "--traces", str(out / "traces"), "--json", str(report), "--expert-shape", "8,8"]
    args += ["--tokens", "4", "--cache-fractions", "0.5", "--repeats", "1", "--policies", "lru"]
    from specmoe.bench import progress

    seen, real_discard = [], progress.discard

    def discard(path):  # what is on disk when the finished runs are let go
        seen.append((report.exists(), path.exists()))
        real_discard(path)

    progress.discard = discard
    try:
        result = runner.invoke(app, [*args, "--experts-dir", str(tmp_path)])
    finally:
        progress.discard = real_discard
    assert result.exit_code == 0, result.output
    assert seen == [(True, True)], "the finished runs were let go before the report was written"
    assert json.loads(report.read_text())["rows"]
    assert not (tmp_path / "o.json.partial.jsonl").exists()


def test_simulate_replays_the_split_asked_for_and_refuses_an_unknown_split_or_eviction(finished_run, tmp_path):
    out, _ = finished_run
    args = ["simulate", "--traces", str(out / "traces"), "--cache-fractions", "0.5", "--max-windows", "2"]
    result = runner.invoke(app, [*args, "--split", "val", "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert report["split"] == "val" and {"lru", "lfu", "lrfu", "belady"} <= {r["policy"] for r in report["rows"]}
    for option, value, message in (
        ("--split", "dev", "--split: Input should be 'train', 'val' or 'test'"),
        (
            "--eviction",
            "fifo",
            "--eviction: Input should be 'lru', 'lfu', 'lrfu', 'belady', 'next-use' or 'lru-per-layer'",
        ),
    ):
        result = runner.invoke(app, [*args, option, value, "--out", str(tmp_path / "bad")])
        assert isinstance(result.exception, InputError)  # the entry point prints it as one line
        assert message in str(result.exception)
    assert not (tmp_path / "bad").exists()
