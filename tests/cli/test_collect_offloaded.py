"""`specmoe collect --fast-tier`: a model collected without its experts in memory records the
routing the resident model computes (with the same, eager, experts implementation)."""

import numpy as np
from typer.testing import CliRunner

from specmoe.cli import app
from specmoe.models.loading import load_model
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.store import TraceStore

runner = CliRunner()


def test_collect_with_a_fast_tier_records_what_the_resident_model_routes(
    tiny_checkpoints, small_corpus, tmp_path, monkeypatch
):
    monkeypatch.setenv("SPECMOE_CACHE", str(tmp_path / "cache"))
    checkpoint = str(tiny_checkpoints["olmoe"])
    args = ["collect", "--model", checkpoint, "--text", str(small_corpus), "--seq-len", "16", "--batch-size", "2"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "offloaded"), "--fast-tier", "25%"])
    assert result.exit_code == 0, result.output
    assert "experts offloaded: " in result.output and (tmp_path / "cache" / "experts").is_dir()
    resident = load_model(checkpoint)
    resident.model.config._experts_implementation = "eager"  # what the offloaded runtime computes with
    config = CollectConfig(
        model=checkpoint, texts=[str(small_corpus)], out=tmp_path / "resident", seq_len=16, batch_size=2, progress=False
    )
    collect(config, loaded=resident)
    offloaded, expected = TraceStore.open(tmp_path / "offloaded"), TraceStore.open(tmp_path / "resident")
    for index in range(len(expected.manifest.shards)):
        mine, theirs = offloaded.read_shard(index), expected.read_shard(index)
        assert np.array_equal(mine.expert_ids, theirs.expert_ids)
        assert np.array_equal(mine.gate_weights, theirs.gate_weights)


def test_collect_reads_the_store_it_is_given(tiny_checkpoints, small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMOE_CACHE", str(tmp_path / "cache"))
    checkpoint = str(tiny_checkpoints["olmoe"])
    store = tmp_path / "store"
    assert runner.invoke(app, ["prepare", checkpoint, "--store", str(store)]).exit_code == 0
    args = ["collect", "--model", checkpoint, "--text", str(small_corpus), "--seq-len", "16", "--max-tokens", "64"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "t"), "--fast-tier", "25%", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "cache" / "experts").exists()  # no second copy in the cache
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "u"), "--store", str(store)])
    assert result.exit_code != 0 and "--store applies to --fast-tier" in str(result.exception)
