import json

import pytest

from specmoe.errors import InputError
from specmoe.run import stages
from specmoe.run.config import load_run_config
from specmoe.run.pipeline import plan, run_pipeline
from tests.run.test_config import REAL_MODEL_CONFIGS
from tests.tiny_models import save_tiny_checkpoint
from tests.tiny_runs import tiny_run_config, write_run_corpus


def test_run_writes_every_stage_output(finished_run):
    out, config = finished_run
    for path in (
        "traces/manifest.json",
        "traces.json",
        "simulation/simulation.json",
        "offload/offload.json",
        "report.html",
        "summary.md",
        "summary.json",
        "config.yaml",
    ):
        assert (out / path).exists(), path
    ledger = json.loads((out / "stages.json").read_text())
    assert all(r["status"] == "done" for r in ledger.values())
    summary = json.loads((out / "summary.json").read_text())
    labels = {p["label"] for p in summary["predictors"]}
    assert labels == {m.label for m in config.predictors.models}  # the tiny traces keep residuals: nothing skipped
    assert "lookahead-corrected" in labels and "lookahead-corrected" in (out / "report.html").read_text()
    for p in summary["predictors"]:
        assert len(p["horizons"]) == min(config.predictors.horizons, summary["model"]["num_layers"] - 1)
        assert all(0 <= h["recall_at_k"] <= 1 for h in p["horizons"])
    assert summary["simulation"]["simulated"] is True and summary["offload"]["simulated"] is False
    assert {r["policy"] for r in summary["offload"]["rows"]} >= {"on-demand", "lru", "prefetch", "oracle"}
    metrics = json.loads((out / "metrics" / "token.json").read_text())
    assert metrics["calibration"][0]["horizon"] == 1 and sum(metrics["calibration"][0]["n"]) > 0


def test_rerun_reuses_finished_stages(finished_run, capsys):
    out, config = finished_run
    before = json.loads((out / "stages.json").read_text())
    manifest_mtime = (out / "traces" / "manifest.json").stat().st_mtime_ns
    run_pipeline(config, out, command="again")
    after = json.loads((out / "stages.json").read_text())
    assert after == before
    assert (out / "traces" / "manifest.json").stat().st_mtime_ns == manifest_mtime
    assert capsys.readouterr().err.count("reused") == len(before)


def test_changed_section_redoes_only_what_reads_it(tiny_checkpoints, tmp_path):
    corpus = write_run_corpus(tmp_path / "c.jsonl")
    base = (
        "predictors.models=[{name: token}]",
        "offload.prefetch_predictors=[token]",
        "simulate.prefetch_predictors=[token]",
    )
    out = tmp_path / "out"
    run_pipeline(tiny_run_config(None, tiny_checkpoints["olmoe"], corpus, offload=False, extra=base), out)
    first = json.loads((out / "stages.json").read_text())
    changed = (*base, "simulate.prefetch.layers_ahead=2")
    run_pipeline(tiny_run_config(None, tiny_checkpoints["olmoe"], corpus, offload=False, extra=changed), out)
    second = json.loads((out / "stages.json").read_text())
    unchanged = ("collect", "describe", "train:token", "evaluate:token")
    assert all(first[name] == second[name] for name in unchanged)
    assert first["simulate"]["fingerprint"] != second["simulate"]["fingerprint"]
    assert json.loads((out / "simulation" / "simulation.json").read_text())["prefetch"]["layers_ahead"] == 2


def test_fingerprints_follow_only_what_a_stage_reads():
    base = {stage.name: stage.fingerprint for stage in plan(load_run_config())}
    edited = load_run_config(
        None,
        [
            "predictors.models=[{name: token}, {name: ngram, params: {context_layers: 2}}]",
            "offload.prefetch_predictors=[token]",
            "simulate.prefetch_predictors=[ngram]",
        ],
    )
    after = {stage.name: stage.fingerprint for stage in plan(edited)}
    assert after["collect"] == base["collect"] and after["train:token"] == base["train:token"]
    assert after["train:ngram"] != base["train:ngram"] and after["simulate"] != base["simulate"]
    assert "train:combo" not in after


def _one_predictor_config(checkpoint, corpus, spec: str, label: str):
    """A tiny run with one predictor (``spec`` in YAML), which also drives prefetch."""
    return tiny_run_config(
        None,
        checkpoint,
        corpus,
        offload=False,
        extra=(
            f"predictors.models=[{spec}]",
            f"offload.prefetch_predictors=[{label}]",
            f"simulate.prefetch_predictors=[{label}]",
        ),
    )


def test_interrupted_run_resumes_without_redoing_work(tiny_checkpoints, tmp_path, monkeypatch):
    corpus = write_run_corpus(tmp_path / "c.jsonl")
    config = _one_predictor_config(tiny_checkpoints["olmoe"], corpus, "{name: ngram}", "ngram")
    out = tmp_path / "out"

    def crash(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "simulate", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, out)
    monkeypatch.undo()
    done = json.loads((out / "stages.json").read_text())
    assert done["simulate"]["status"] == "running" and done["collect"]["status"] == "done"
    run_pipeline(config, out)
    resumed = json.loads((out / "stages.json").read_text())
    assert resumed["collect"] == done["collect"] and resumed["train:ngram"] == done["train:ngram"]
    assert resumed["simulate"]["status"] == "done" and (out / "report.html").exists()


@pytest.mark.parametrize("path", REAL_MODEL_CONFIGS, ids=lambda p: p.stem)
def test_real_model_config_runs_on_a_tiny_model_of_its_architecture(path, tmp_path):
    """The config unchanged but for the checkpoint and the sizes: every stage it asks for runs."""
    model_type = load_run_config(path).model.model_type
    checkpoint = save_tiny_checkpoint(model_type, tmp_path / model_type)
    corpus = write_run_corpus(tmp_path / "c.jsonl")
    config = tiny_run_config(
        path, checkpoint, corpus, extra=("predictors.bootstrap=0", "offload.cache_fractions=[0.25]")
    )
    summary = run_pipeline(config, tmp_path / "out")
    assert summary["model"]["model_type"] == model_type
    assert {p["label"] for p in summary["predictors"]} == {m.label for m in config.predictors.models}
    assert summary["offload"]["rows"]


def test_config_for_another_architecture_is_refused(tiny_checkpoints, tmp_path):
    corpus = write_run_corpus(tmp_path / "c.jsonl")
    config = tiny_run_config(
        REAL_MODEL_CONFIGS[0], tiny_checkpoints["olmoe"], corpus, extra=("model.model_type=mixtral",)
    )
    with pytest.raises(InputError, match="is a 'olmoe' checkpoint; this config is for 'mixtral'"):
        run_pipeline(config, tmp_path / "out")


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "traces").mkdir()
    with pytest.raises(InputError, match="no `specmoe run` wrote"):
        run_pipeline(load_run_config(), tmp_path)


class _StageRan(Exception):
    pass


def _stale_stage_run(tmp_path, monkeypatch, output):
    """Run the pipeline with one stage writing ``output`` that an earlier config finished,
    so the rerun wants to remove that output first."""
    from specmoe.run import pipeline

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "stages.json").write_text(json.dumps({"evil": {"fingerprint": "old", "status": "done", "seconds": 1}}))

    def action(config, run_dir):
        raise _StageRan

    monkeypatch.setattr(pipeline, "plan", lambda config: [pipeline.Stage("evil", {"v": 1}, action, output)])
    run_pipeline(load_run_config(), out)


@pytest.fixture
def victim(tmp_path):
    directory = tmp_path / "victim"
    (directory / "token").mkdir(parents=True)
    (directory / "token" / "precious").write_text("not the run's")
    return directory


@pytest.mark.parametrize("output", ["../victim", "predictors/../../victim", "{absolute}"])
def test_a_stage_output_outside_the_run_directory_is_never_deleted(tmp_path, monkeypatch, victim, output):
    # Every victim lies in tmp_path: with the protection removed, this test must fail by
    # deleting its own victim, never a path of the machine.
    with pytest.raises(InputError, match="not a safe name|must be a relative path"):
        _stale_stage_run(tmp_path, monkeypatch, output.format(absolute=victim))
    assert (victim / "token" / "precious").exists()


def test_a_link_in_the_run_directory_is_removed_never_followed(tmp_path, monkeypatch, victim):
    (tmp_path / "out" / "predictors").mkdir(parents=True)
    (tmp_path / "out" / "predictors" / "token").symlink_to(victim / "token")
    with pytest.raises(_StageRan):
        _stale_stage_run(tmp_path, monkeypatch, "predictors/token")
    assert not (tmp_path / "out" / "predictors" / "token").exists()
    assert (victim / "token" / "precious").exists()


def test_a_linked_parent_that_leads_out_of_the_run_directory_is_refused(tmp_path, monkeypatch, victim):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictors").symlink_to(victim)
    with pytest.raises(InputError, match="outside"):
        _stale_stage_run(tmp_path, monkeypatch, "predictors/token")
    assert (victim / "token" / "precious").exists()


def test_a_second_run_into_the_same_directory_is_refused(tmp_path):
    from specmoe.storage.locks import DirectoryLockedError
    from tests.storage.test_locks import _holder

    holder = _holder(tmp_path / "out")
    try:
        # A model that does not exist: were the lock not checked, the run would fail at once on it.
        with pytest.raises(DirectoryLockedError, match=f"in use by pid {holder.pid}"):
            run_pipeline(load_run_config(None, [f"model.id={tmp_path / 'no-model'}"]), tmp_path / "out")
    finally:
        holder.kill()
        holder.wait()


def test_an_unreadable_stage_record_is_one_clear_error(tmp_path):
    from specmoe.errors import CorruptDataError

    (tmp_path / "stages.json").write_text('{"collect": ')
    with pytest.raises(CorruptDataError, match="stages.json: not a readable stage record"):
        run_pipeline(load_run_config(), tmp_path)


def test_a_run_killed_while_training_resumes_and_leaves_no_temporaries(tiny_checkpoints, tmp_path):
    """SIGKILL `specmoe run` as it renames its first training checkpoint into place."""
    import os
    import subprocess
    import sys

    from tests.traces.test_collector import KILL_ON_COMMIT

    corpus = write_run_corpus(tmp_path / "c.jsonl")
    spec = "{name: interlayer, preset: small, params: {epochs: 2, max_steps_per_epoch: 2, batch_size: 64}}"
    config = _one_predictor_config(tiny_checkpoints["olmoe"], corpus, spec, "'interlayer:small'")
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    args = ["run", "--config", str(path), "--out", str(tmp_path / "out")]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_ON_COMMIT, "trainer.json", *args], env=env, capture_output=True, check=False
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    stages_done = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert stages_done["train:interlayer:small"]["status"] == "running"
    resumed = subprocess.run(
        [sys.executable, "-m", "specmoe", *args], env=env, capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "stages.json").read_text())["collect"] == stages_done["collect"]
    leftovers = [str(p) for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    checkpoints = tmp_path / "out" / "predictors" / "interlayer:small" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch-0001", "epoch-0002"]
