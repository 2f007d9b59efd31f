"""One writer per directory; a killed writer's lock is taken over; ranks of one job share."""

import json
import os
import signal
import subprocess
import sys

import pytest

from specmoe.storage.locks import LOCK_FILE, DirectoryLock, DirectoryLockedError, torchrun_job

HOLDER = """
import sys, time
from specmoe.storage.locks import DirectoryLock
job = sys.argv[2] if sys.argv[2] != "-" else None
member = sys.argv[3] if sys.argv[3] != "-" else None
lock = DirectoryLock(sys.argv[1], "test holder", job=job, member=member, join_grace_s=1.0)
try:
    lock.acquire()
except Exception as exc:
    print("refused:", exc, flush=True)
    sys.exit(3)
print("locked", lock.first, flush=True)
time.sleep(120)
"""


def _holder(directory, job="-", member="-"):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory), job, member],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    proc.first_line = proc.stdout.readline().strip()
    return proc


@pytest.fixture
def holders():
    started = []
    yield lambda *args, **kwargs: started.append(_holder(*args, **kwargs)) or started[-1]
    for proc in started:
        proc.kill()
        proc.wait()


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path, holders):
    first = holders(tmp_path / "out")
    assert first.first_line == "locked True"
    with pytest.raises(DirectoryLockedError, match=rf"in use by pid {first.pid} on .*test holder"):
        DirectoryLock(tmp_path / "out", "second writer", job=None).acquire()


def test_a_killed_holder_leaves_no_lock_behind(tmp_path, holders):
    first = holders(tmp_path / "out")
    first.send_signal(signal.SIGKILL)
    first.wait()
    with DirectoryLock(tmp_path / "out", "next writer", job=None) as lock:
        assert lock.first
        assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_members_of_one_job_share_the_lock_and_outsiders_do_not(tmp_path, holders):
    out = tmp_path / "out"
    rank0 = holders(out, "job-a", "rank-0")
    rank1 = holders(out, "job-a", "rank-1")
    assert rank0.first_line == "locked True" and rank1.first_line == "locked False"
    assert holders(out, "job-b", "rank-0").first_line.startswith("refused:")
    assert holders(out, "job-a", "rank-1").first_line.startswith("refused:")  # that rank is taken
    with pytest.raises(DirectoryLockedError, match=f"pid {rank0.pid}.*job job-a"):
        DirectoryLock(out, "lone writer", job=None).acquire()


def test_members_starting_together_all_get_in(tmp_path, holders):
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(out), "job", f"rank-{r}"],
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            for r in range(3)
        ]
        try:
            lines = sorted(p.stdout.readline().strip() for p in procs)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        assert lines == ["locked False", "locked False", "locked True"]


def test_the_lock_is_reentrant_inside_one_process(tmp_path):
    with DirectoryLock(tmp_path, "outer", job=None) as outer, DirectoryLock(tmp_path, "inner", job=None) as inner:
        assert outer.first and not inner.first
    with DirectoryLock(tmp_path, "again", job=None) as again:  # released by both exits
        assert again.first


def test_torchrun_job_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert torchrun_job() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert torchrun_job() == ("abc:node1:29500", "rank-1")
    lock = DirectoryLock("unused", "x")
    assert (lock.job, lock.member) == ("abc:node1:29500", "rank-1")
