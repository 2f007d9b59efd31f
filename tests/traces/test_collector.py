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
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.store import TraceStore
from specmoe.traces.windows import plan_windows


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
    with pytest.raises(InputError, match="other settings"):  # batching pads, which can change the routing
        _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16, batch_size=5)


def test_the_device_the_model_ran_on_is_in_the_fingerprint(tiny_checkpoints, small_corpus, tmp_path):
    """Another device's arithmetic can flip a near-tie in the routing; CPU stores keep the
    fingerprint they had before devices were recorded."""
    from specmoe.traces.collector import _new_manifest

    loaded = load_model(str(tiny_checkpoints["olmoe"]))
    cfg = CollectConfig(
        model=str(tiny_checkpoints["olmoe"]), texts=[str(small_corpus)], out=tmp_path / "t", windows_per_shard=256
    )  # as collect() resolves it
    on_cpu, _ = _new_manifest(cfg, loaded, 32)
    loaded.model.parameters = lambda: iter([torch.empty(1, device="meta")])  # as if placed elsewhere
    elsewhere, _ = _new_manifest(cfg, loaded, 32)
    assert on_cpu.collection.fingerprint != elsewhere.collection.fingerprint


def test_a_store_of_before_the_batch_size_joined_the_fingerprint_still_resumes(
    tiny_checkpoints, small_corpus, tmp_path, monkeypatch
):
    from specmoe.traces import collector

    out = tmp_path / "t"
    _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16, batch_size=4)
    manifest = json.loads((out / "manifest.json").read_text())
    real = collector._new_manifest
    legacy = {}

    def remember(*args):
        fresh, old = real(*args)
        legacy["fingerprint"] = old
        return fresh, old

    monkeypatch.setattr(collector, "_new_manifest", remember)
    _collect(tiny_checkpoints["olmoe"], small_corpus, tmp_path / "probe", seq_len=16, batch_size=4)
    manifest["collection"]["fingerprint"] = legacy["fingerprint"]  # as an older specmoe wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16, batch_size=4)  # accepted
    with pytest.raises(InputError, match="other settings"):
        _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16, batch_size=5)


def test_empty_corpus_and_missing_file_are_clear_errors(tiny_checkpoints, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no text"):
        _collect(tiny_checkpoints["olmoe"], empty, tmp_path / "a")
    with pytest.raises(InputError, match="not found"):
        _collect(tiny_checkpoints["olmoe"], tmp_path / "nope.txt", tmp_path / "b")


def test_a_failed_collect_does_not_block_the_rerun_once_the_input_is_fixed(tiny_checkpoints, small_corpus, tmp_path):
    corpus = tmp_path / "fixed-later.jsonl"
    corpus.write_text("")
    with pytest.raises(InputError, match="no text"):
        _collect(tiny_checkpoints["olmoe"], corpus, tmp_path / "t", seq_len=16)
    corpus.write_text(small_corpus.read_text())  # the input fixed: a new fingerprint
    assert _collect(tiny_checkpoints["olmoe"], corpus, tmp_path / "t", seq_len=16).manifest.complete


def test_leftovers_of_a_kill_during_the_first_manifest_write_do_not_block_the_rerun(
    tiny_checkpoints, small_corpus, tmp_path
):
    out = tmp_path / "t"
    out.mkdir()
    (out / ".manifest.json.tmp-4242").write_text('{"format": "specmo')  # what the kill left
    assert _collect(tiny_checkpoints["olmoe"], small_corpus, out, seq_len=16).manifest.complete
    assert not (out / ".manifest.json.tmp-4242").exists()


def _cli(*args):
    return [sys.executable, "-m", "specmoe", *map(str, args)]


KILL_ON_COMMIT = """
import os, signal, sys
from specmoe.storage import atomic
pattern = sys.argv.pop(1)
real = atomic.commit
def commit(tmp, final):
    if pattern in os.path.basename(str(final)):
        os.kill(os.getpid(), signal.SIGKILL)  # a kill after the data is written, before the rename
    real(tmp, final)
atomic.commit = commit
from specmoe.cli import main
sys.argv[0] = "specmoe"
main()
"""


def _killed_at(pattern, *args):
    """`specmoe ARGS` SIGKILLed as it is about to rename the file whose name holds ``pattern``."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_ON_COMMIT, pattern, *map(str, args)], env=env, capture_output=True, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("pattern", ["manifest.json", "shard-00000.router_input"])
def test_a_kill_at_any_write_leaves_a_store_that_the_rerun_completes(tiny_checkpoints, small_corpus, tmp_path, pattern):
    args = ["collect", "--model", tiny_checkpoints["olmoe"], "--text", small_corpus, "--seq-len", "16"]
    args += ["--windows-per-shard", "4", "--save-router-inputs", "--out", tmp_path / "t"]
    _killed_at(pattern, *args)
    assert [p.name for p in (tmp_path / "t").iterdir() if ".tmp-" in p.name]  # the kill left a temporary
    subprocess.run(_cli(*args), env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=True, capture_output=True)
    resumed = TraceStore.open(tmp_path / "t", verify_checksums=True)
    reference = _collect(
        tiny_checkpoints["olmoe"],
        small_corpus,
        tmp_path / "r",
        seq_len=16,
        windows_per_shard=4,
        save_router_inputs=True,
    )
    assert resumed.manifest.complete and resumed.manifest.num_tokens == reference.manifest.num_tokens
    for a, b in zip(resumed.iter_shards(), reference.iter_shards()):
        assert np.array_equal(a.expert_ids, b.expert_ids) and np.array_equal(a.token_ids, b.token_ids)
    assert not [p.name for p in (tmp_path / "t").iterdir() if ".tmp-" in p.name]


def test_a_second_collect_into_the_same_directory_is_refused_naming_the_first(tiny_checkpoints, tmp_path):
    args = ["collect", "--model", tiny_checkpoints["olmoe"], "--text", "builtin", "--seq-len", "32"]
    args += ["--max-tokens", "200000", "--batch-size", "2", "--windows-per-shard", "4", "--out", tmp_path / "t"]
    first = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "t" / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(
            _cli(*args[:-2], "--batch-size", "3", "--out", tmp_path / "t"), capture_output=True, text=True, check=False
        )
        assert second.returncode == 2, second.stderr
        assert f"in use by pid {first.pid}" in second.stderr and "specmoe collect" in second.stderr
        assert first.poll() is None  # the first one runs on, untouched
    finally:
        first.kill()
        first.wait()


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


def test_a_full_disk_is_one_line_and_the_store_resumes_once_there_is_room(tiny_checkpoints, tiny_filesystem):
    args = ["collect", "--model", tiny_checkpoints["olmoe"], "--text", "builtin", "--max-tokens", "20000"]
    args += ["--seq-len", "32", "--windows-per-shard", "64", "--save-router-inputs", "--out", tiny_filesystem / "t"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, check=False)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
    error = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no space left on the device" in error[0] and str(tiny_filesystem) in error[0]
    partial = TraceStore.open(tiny_filesystem / "t", verify_checksums=True)  # what it kept is whole
    assert not partial.manifest.complete
    assert not [p.name for p in (tiny_filesystem / "t").iterdir() if ".tmp-" in p.name]
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_filesystem)], check=True)
    subprocess.run(_cli(*args), env=env, check=True, capture_output=True)
    assert TraceStore.open(tiny_filesystem / "t", verify_checksums=True).manifest.complete
