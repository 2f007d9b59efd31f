"""Bad stores fail with errors that name the file; `traces info` reports the summary."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
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


def _flip(path, position, mask=0xFF):
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


def test_bit_flip_is_caught_by_checksum(store_dir):
    shard = store_dir / "shard-00000.parquet"
    _flip(shard, shard.stat().st_size // 2)
    store = TraceStore.open(store_dir)  # sizes still match: caught when the shard is read
    with pytest.raises(CorruptStoreError, match="shard-00000.parquet.*SHA-256.*collect the traces again"):
        store.read_shard(0)
    with pytest.raises(CorruptStoreError, match="shard-00000.parquet.*SHA-256"):
        TraceStore.open(store_dir, verify_checksums=True)


def test_no_flipped_byte_of_a_shard_is_ever_decoded(store_dir):
    """Every position: most flips would decode to other values without the checksum."""
    shard = store_dir / "shard-00000.parquet"
    original = shard.read_bytes()
    reference = TraceStore.open(store_dir).read_shard(0)
    for position in range(0, len(original), max(1, len(original) // 97)):
        _flip(shard, position, 0x10)
        with pytest.raises(CorruptStoreError, match="shard-00000.parquet"):
            TraceStore.open(store_dir).read_shard(0)
        shard.write_bytes(original)
    assert (TraceStore.open(store_dir).read_shard(0).expert_ids == reference.expert_ids).all()


def test_hidden_states_are_hashed_once_then_again_after_any_write(store_dir, monkeypatch):
    from specmoe.storage import integrity

    hashed = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(path) or real(path))
    path = store_dir / "shard-00000.router_input.safetensors"
    TraceStore.open(store_dir).hidden_states(0)
    assert hashed == []  # the collector recorded the marker when it wrote the file
    stat = path.stat()
    _flip(path, stat.st_size - 3)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # an old mtime does not hide the write
    with pytest.raises(CorruptStoreError, match="router_input.safetensors.*SHA-256"):
        TraceStore.open(store_dir).hidden_states(0)
    _flip(path, stat.st_size - 3)  # back to the bytes that were written
    TraceStore.open(store_dir).hidden_states(0)
    TraceStore.open(store_dir).hidden_states(0)
    assert hashed == [path, path]  # the failed check and the one that re-verified; then the marker


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("expert_ids", 99, "expert id 99 outside"),
        ("expert_ids", -7, "expert id -7 outside"),
        ("gate_weights", float("nan"), "gate weights hold NaN"),
    ],
)
def test_values_out_of_range_are_refused_even_with_a_matching_checksum(tmp_path, column, value, message):
    from tests.predictors.synthetic import make_synthetic_store

    store = make_synthetic_store(tmp_path / "s", num_docs=8)
    table = pq.read_table(store.path_of(store.manifest.shards[0].routing))
    name = f"decoder.{column}"
    values = table.column(name).combine_chunks().flatten().to_numpy().copy()
    values[5] = value
    width = table.column(name).type.list_size
    bad = table.set_column(
        table.column_names.index(name), name, pa.FixedSizeListArray.from_arrays(pa.array(values), width)
    )
    store.manifest.shards.clear()
    store.manifest.num_tokens = 0
    store.write_shard(0, bad, {}, 0, 8)  # a faulty writer: the checksum describes the bad values
    with pytest.raises(CorruptStoreError, match=message):
        TraceStore.open(tmp_path / "s").read_shard(0)


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
