"""Bad stores fail with errors that name the file; `traces info` reports the summary."""

import json

import pytest
from typer.testing import CliRunner

from specmoe.cli import app
from specmoe.errors import CorruptStoreError
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.store import TraceStore


@pytest.fixture
def store_dir(tiny_checkpoints, small_corpus, tmp_path):
    out = tmp_path / "traces"
    collect(
        CollectConfig(
            model=str(tiny_checkpoints["olmoe"]),
            texts=[str(small_corpus)],
            out=out,
            seq_len=16,
            windows_per_shard=4,
            save_router_inputs=True,
            progress=False,
        )
    )
    return out


def test_truncated_shard_is_named(store_dir):
    shard = store_dir / "shard-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CorruptStoreError, match="shard-00001.parquet.*truncated"):
        TraceStore.open(store_dir)


def test_bit_flip_is_caught_by_checksum(store_dir):
    shard = store_dir / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    TraceStore.open(store_dir)  # sizes still match
    with pytest.raises(CorruptStoreError, match="shard-00000.parquet.*SHA-256"):
        TraceStore.open(store_dir, verify_checksums=True)


def test_manifest_row_count_must_match_shard(store_dir):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["shards"][0]["num_tokens"] += 1
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="shard-00000.parquet.*rows"):
        TraceStore.open(store_dir).read_shard(0)


def test_missing_and_malformed_manifest(store_dir, tmp_path):
    with pytest.raises(CorruptStoreError, match="no manifest.json"):
        TraceStore.open(tmp_path)
    (store_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        TraceStore.open(store_dir)


def test_corrupt_hidden_states_are_named(store_dir):
    path = store_dir / "shard-00000.router_input.safetensors"
    path.write_bytes(b"\x00" * path.stat().st_size)
    with pytest.raises(CorruptStoreError, match="router_input"):
        TraceStore.open(store_dir).hidden_states(0)


def test_traces_info_json(store_dir):
    result = CliRunner().invoke(app, ["traces", "info", str(store_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["num_layers"] == 2 and summary["num_experts"] == 8 and summary["top_k"] == 2
    assert summary["num_documents"] == 6 and summary["num_tokens"] == TraceStore.open(store_dir).manifest.num_tokens
    layer0 = summary["statistics"]["decoder"]["layers"][0]
    assert 0 < layer0["usage_entropy_bits"] <= 3.0 and 0 < layer0["most_used_share"] <= 1
    assert "next_layer_mi_bits" in layer0


def test_cli_reports_bad_store_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "specmoe", "traces", "info", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("field", ["routing", "router_input"])
@pytest.mark.parametrize("name", ["../victim.parquet", "{absolute}", "sub/shard.parquet", ".."])
def test_manifest_file_names_cannot_leave_the_store(store_dir, field, name):
    victim = store_dir.parent / "victim.parquet"
    victim.write_bytes(b"someone else's")
    manifest = json.loads((store_dir / "manifest.json").read_text())
    entry = manifest["shards"][0]["routing"] if field == "routing" else manifest["shards"][0]["hidden"][field]
    entry["file"] = name.format(absolute=victim)
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="not a safe name"):
        TraceStore.open(store_dir)
    assert victim.read_bytes() == b"someone else's"


def test_manifest_with_an_unknown_hidden_kind_is_refused(store_dir):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    shard = manifest["shards"][0]
    shard["hidden"]["../../x"] = shard["hidden"]["router_input"]
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptStoreError, match="unknown hidden-state kinds"):
        TraceStore.open(store_dir)
