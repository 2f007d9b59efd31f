"""Collection into a store, read-back, resume after a real kill, and settings mismatches."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.traces.collector import CollectConfig, collect, plan_windows
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.store import TraceStore


def _collect(checkpoint, text, out, **kw):
    return collect(CollectConfig(model=str(checkpoint), texts=[str(text)], out=out, progress=False, **kw))


@pytest.mark.parametrize("model_type", ["olmoe", "switch_transformers"])
def test_store_holds_every_token_with_the_routing_of_a_direct_run(tiny_checkpoints, small_corpus, tmp_path, model_type):
    checkpoint = tiny_checkpoints[model_type]
    store = _collect(
        checkpoint, small_corpus, tmp_path / "t", seq_len=16, batch_size=3, windows_per_shard=4, save_router_inputs=True
    )
    loaded = load_model(str(checkpoint))
    windows = list(plan_windows([str(small_corpus)], loaded.tokenizer, 16))
    assert store.manifest.complete
    assert store.manifest.num_tokens == sum(len(w.token_ids) for w in windows)
    assert len(store.manifest.shards) == -(-len(windows) // 4)
    # Routing of the first window, recomputed alone, must equal the stored rows.
    first = windows[0]
    ids = torch.tensor([first.token_ids])
    with torch.no_grad(), RoutingRecorder(loaded) as recorder:
        loaded.adapter.forward(loaded.model, ids, torch.ones_like(ids))
        records = recorder.pop()
    for stack in store.stacks:
        shard = store.read_shard(0, stack)
        rows = shard.windows == 0
        assert list(shard.token_ids[rows]) == first.token_ids
        assert set(shard.doc_ids[rows]) == {first.doc_id}
        direct = np.stack([records[(stack, l)].expert_ids.numpy() for l in range(loaded.stacks[stack])], 1)
        assert np.array_equal(shard.expert_ids[rows], direct)
        assert store.hidden_states(0, "router_input", stack).shape == (rows.size, loaded.stacks[stack], 32)


def test_documents_are_recorded_and_windows_do_not_cross_them(tiny_checkpoints, small_corpus, tmp_path):
    store = _collect(tiny_checkpoints["olmoe"], small_corpus, tmp_path / "t", seq_len=16)
    docs = np.concatenate([s.doc_ids for s in store.iter_shards()])
    windows = np.concatenate([s.windows for s in store.iter_shards()])
    assert set(docs) == {f"doc{i}" for i in range(6)}
    for window in np.unique(windows):
        assert len(set(docs[windows == window])) == 1


def test_rerun_of_a_finished_store_is_a_no_op_and_other_settings_are_refused(tiny_checkpoints, small_corpus, tmp_path):
    out = tmp_path / "t"
    _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16)
    before = (out / "manifest.json").read_text()
    _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16)
    assert (out / "manifest.json").read_text() == before
    with pytest.raises(InputError, match="other settings"):
        _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=32)


def test_empty_corpus_and_missing_file_are_clear_errors(tiny_checkpoints, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no text"):
        _collect(tiny_checkpoints["olmoe"], empty, tmp_path / "a")
    with pytest.raises(InputError, match="not found"):
        _collect(tiny_checkpoints["olmoe"], tmp_path / "nope.txt", tmp_path / "b")


def _cli(*args):
    return [sys.executable, "-m", "specmoe", *map(str, args)]


def test_kill_and_rerun_loses_nothing_and_duplicates_nothing(tiny_checkpoints, tmp_path):
    """SIGKILL a real `specmoe collect` mid-run, rerun the same command, and compare with a
    run that was never interrupted."""
    args = [
        "collect",
        "--model",
        tiny_checkpoints["olmoe"],
        "--text",
        "builtin",
        "--max-tokens",
        "12000",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--windows-per-shard",
        "4",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = killed / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"], "the run finished before it could be killed; give it more work"
    subprocess.run(_cli(*args, "--out", killed), env=env, check=True, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run(_cli(*args, "--out", clean), env=env, check=True, capture_output=True)

    resumed, reference = TraceStore.open(killed, verify_checksums=True), TraceStore.open(clean)
    assert resumed.manifest.complete and resumed.manifest.num_tokens == reference.manifest.num_tokens
    assert len(resumed.manifest.shards) == len(reference.manifest.shards)
    for a, b in zip(resumed.iter_shards(), reference.iter_shards()):
        assert np.array_equal(a.windows, b.windows) and np.array_equal(a.expert_ids, b.expert_ids)
        assert np.array_equal(a.token_ids, b.token_ids)
    listed = {e.file for s in resumed.manifest.shards for e in (s.routing, *s.hidden.values())}
    metadata = {"manifest.json", ".specmoe.verified.json", ".specmoe.lock"}
    assert sorted(p.name for p in killed.iterdir() if p.name not in listed | metadata) == []
