"""`torchrun -m specmoe collect` with two CPU processes (gloo): the store it writes is the one
a single process writes, byte for byte, also after a rank is killed and the job rerun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from specmoe.errors import InputError
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.distributed import check_world_size
from specmoe.traces.store import TraceStore

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
SETTINGS = {"max_tokens": 6000, "seq_len": 32, "batch_size": 4, "windows_per_shard": 4}
pytestmark = pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed beside this python")


def _config(checkpoint, out) -> CollectConfig:
    return CollectConfig(model=str(checkpoint), texts=["builtin"], out=out, progress=False, **SETTINGS)


def _torchrun_collect(checkpoint, out) -> list[str]:
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    return [TORCHRUN, "--nproc-per-node", "2", "-m", "specmoe", "collect", "--model", str(checkpoint)] + [
        "--text",
        "builtin",
        "--out",
        str(out),
        *flags,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def one_process_store(tiny_checkpoints, tmp_path_factory):
    # One thread, as each torchrun rank has (ENV): how a matmul splits over threads can change
    # the last bits of the gate weights, and the stores are compared byte for byte.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return collect(_config(tiny_checkpoints["olmoe"], tmp_path_factory.mktemp("single") / "traces"))
    finally:
        torch.set_num_threads(threads)


def _assert_same_store(store: TraceStore, reference: TraceStore) -> None:
    assert (store.directory / "manifest.json").read_text() == (reference.directory / "manifest.json").read_text()
    for ours, theirs in zip(store.iter_shards(), reference.iter_shards(), strict=True):
        for column in ("windows", "positions", "token_ids", "expert_ids", "gate_weights"):
            assert np.array_equal(getattr(ours, column), getattr(theirs, column)), column
    assert sorted(p.name for p in store.directory.iterdir()) == sorted(p.name for p in reference.directory.iterdir())


def test_two_processes_write_the_store_one_process_writes(tiny_checkpoints, one_process_store, tmp_path):
    out = tmp_path / "traces"
    proc = subprocess.run(
        _torchrun_collect(tiny_checkpoints["olmoe"], out),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone reports
    store = TraceStore.open(out, verify_checksums=True)
    assert store.manifest.complete and len(store.manifest.shards) > 2
    _assert_same_store(store, one_process_store)


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process of rank {rank} under torchrun")


def test_a_killed_rank_resumes_on_the_same_command_and_another_rank_count_is_refused(
    tiny_checkpoints, one_process_store, tmp_path
):
    out = tmp_path / "traces"
    command = _torchrun_collect(tiny_checkpoints["olmoe"], out)
    job = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".ranks" / "rank-00001-of-00002" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2:
            break
        time.sleep(0.01)
    os.kill(_rank_pid(job.pid, 1), signal.SIGKILL)
    assert job.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    killed = TraceStore.open(out)
    assert not killed.manifest.complete, "the job finished before the kill; give it more work"
    assert killed.manifest.shards == []  # rank 0 lists shards only once every rank is done

    with pytest.raises(InputError, match="started by 2 processes"):
        collect(_config(tiny_checkpoints["olmoe"], out))

    subprocess.run(command, env=ENV, check=True, capture_output=True, timeout=300)
    resumed = TraceStore.open(out, verify_checksums=True)
    assert resumed.manifest.complete
    _assert_same_store(resumed, one_process_store)


def test_a_one_process_store_is_not_resumed_by_two(one_process_store, tmp_path):
    out = tmp_path / "traces"
    shutil.copytree(one_process_store.directory, out)
    unfinished = TraceStore.open(out).manifest
    unfinished.complete = False
    check_world_size(out, unfinished, 1)
    with pytest.raises(InputError, match="was started by one process"):
        check_world_size(out, unfinished, 2)
