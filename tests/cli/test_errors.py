"""Every foreseeable failure of the `specmoe` command: one line naming the path and what to
do, a non-zero status, no traceback; `--debug` / SPECMOE_DEBUG=1 show the traceback.

Most run the entry point in this process (a new process costs seconds of imports); the ones
about tracebacks and signals run a real one."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.predictors.synthetic import make_synthetic_store, save_popularity

ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def specmoe_process(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "specmoe", *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        timeout=300,
        check=False,
    )


def specmoe(*args):
    """``specmoe ARGS`` through its entry point in this process: its status and stderr."""
    from specmoe.cli import main

    argv, sigterm, stderr = sys.argv, signal.getsignal(signal.SIGTERM), io.StringIO()
    sys.argv = ["specmoe", *map(str, args)]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            main()
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, sigterm)
    return SimpleNamespace(returncode=status, stderr=stderr.getvalue())


def one_line_error(proc, *expected, status=2):
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("errors") / "traces", num_docs=16).directory


@pytest.fixture
def flipped_store(store, tmp_path):
    import shutil

    copy = tmp_path / "traces"
    shutil.copytree(store, copy)
    shard = copy / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 16] = bytes(b ^ 0x5A for b in data[len(data) // 3 : len(data) // 3 + 16])
    shard.write_bytes(bytes(data))
    return copy


def test_train_and_evaluate_refuse_a_corrupt_shard_in_one_line(flipped_store, tmp_path):
    train = specmoe("train", "--predictor", "popularity", "--traces", flipped_store, "--out", tmp_path / "p")
    one_line_error(train, "shard-00000.parquet", "SHA-256", "collect the traces again")
    save_popularity(tmp_path / "q", 4, 16)
    evaluate = specmoe("evaluate", "--predictor-dir", tmp_path / "q", "--traces", flipped_store, "--bootstrap", "0")
    one_line_error(evaluate, "shard-00000.parquet", "SHA-256")


def test_debug_flag_and_environment_show_the_traceback(flipped_store, tmp_path):
    for args, env in ((("--debug",), None), ((), {"SPECMOE_DEBUG": "1"})):
        proc = specmoe_process(
            *args, "train", "--predictor", "popularity", "--traces", flipped_store, "--out", tmp_path, env=env
        )
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "CorruptStoreError" in proc.stderr


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["params"].update(horizons="3"), "horizons='3' must be int"),
        (lambda c: c["params"].update(smoothing=-1.0), "smoothing=-1.0 must be a finite number >= 0"),
        (lambda c: c["meta"].update(num_layers=0), "meta must hold positive integers"),
        (lambda c: c.update(predictor=["popularity"]), "not a predictor config"),
        (lambda c: c["params"].update(unknown=1), "has no parameter ['unknown']"),
    ],
)
def test_a_predictor_file_with_wrong_types_or_ranges_is_one_line(store, tmp_path, edit, expected):
    directory = save_popularity(tmp_path / "p", 4, 16)
    config = json.loads((directory / "predictor.json").read_text())
    edit(config)
    (directory / "predictor.json").write_text(json.dumps(config))
    proc = specmoe("evaluate", "--predictor-dir", directory, "--traces", store, "--bootstrap", "0")
    one_line_error(proc, "predictor.json", expected)


def test_corrupt_or_truncated_predictor_weights_are_never_loaded(store, tmp_path):
    directory = save_popularity(tmp_path / "p", 4, 16)
    weights = directory / "predictor.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a float of the table: would load without complaint
    weights.write_bytes(bytes(data))
    one_line_error(specmoe("evaluate", "--predictor-dir", directory, "--traces", store), "predictor.safetensors")
    weights.write_bytes(bytes(data[: len(data) // 2]))
    one_line_error(specmoe("evaluate", "--predictor-dir", directory, "--traces", store), "predictor.safetensors")
    (directory / "predictor.json").write_bytes(b"\xff\xfe{")
    one_line_error(specmoe("evaluate", "--predictor-dir", directory, "--traces", store), "predictor.json", "UTF-8")


def test_missing_files_are_named(store, tmp_path):
    one_line_error(specmoe("evaluate", "--predictor-dir", tmp_path / "none", "--traces", store), "none")
    one_line_error(specmoe("traces", "info", tmp_path / "nowhere"), "nowhere")


def test_resume_with_another_preset_is_one_line(store, tmp_path):
    args = ["train", "--predictor", "interlayer", "--traces", store, "--out", tmp_path / "p", "--epochs", "1"]
    args += ["--max-steps-per-epoch", "2", "--param", "batch_size=64"]
    first = specmoe(*args, "--preset", "small")
    assert first.returncode == 0, first.stderr
    one_line_error(specmoe(*args, "--preset", "baseline", "--resume"), "made with other settings", "without --resume")


def test_an_invalid_utf8_corpus_is_one_line(tiny_checkpoints, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "fine words here"}\n{"text": "bad \xc3\x28 bytes"}\n')
    proc = specmoe("collect", "--model", tiny_checkpoints["olmoe"], "--text", corpus, "--out", tmp_path / "t")
    one_line_error(proc, "c.jsonl:2", "not UTF-8")


def test_an_unexpected_error_is_one_line_pointing_at_debug(monkeypatch, capsys):
    from specmoe import cli
    from specmoe.models import registry

    class Broken:
        def __iter__(self):
            raise RuntimeError("something no check foresaw")

    monkeypatch.setattr(registry, "ADAPTERS", Broken())
    monkeypatch.setattr(sys, "argv", ["specmoe", "models", "list"])
    monkeypatch.delenv("SPECMOE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "unexpected RuntimeError: something no check foresaw" in err
    assert "--debug" in err and "Traceback" not in err
    monkeypatch.setenv("SPECMOE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="no check foresaw"):
        cli.main()


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_ctrl_c_and_sigterm_stop_with_a_line_and_the_rerun_resumes(tiny_checkpoints, tmp_path, signum, status):
    import time

    args = ["collect", "--model", tiny_checkpoints["olmoe"], "--text", "builtin", "--max-tokens", "12000"]
    args += ["--seq-len", "32", "--batch-size", "2", "--windows-per-shard", "4", "--out", tmp_path / "t"]
    # A shell running the suite in the background starts it with SIGINT ignored, which a child
    # inherits; a user's terminal does not. The child restores Python's Ctrl-C handler first.
    child = "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    child += "sys.argv[0] = 'specmoe'; runpy.run_module('specmoe', run_name='__main__')"
    proc = subprocess.Popen([sys.executable, "-c", child, *map(str, args)], env=ENV, stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "t" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.exists() and json.loads(manifest.read_text())["shards"]):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    if signum == 2:
        assert "interrupted: finished work is kept" in err and "Traceback" not in err
    done = len(json.loads(manifest.read_text())["shards"])
    assert done >= 1 and not json.loads(manifest.read_text())["complete"]
    if signum == 2:  # the rerun resumes (the same for both: a signal unwinds, nothing is half-written)
        assert specmoe(*args).returncode == 0
        assert json.loads(manifest.read_text())["complete"]
