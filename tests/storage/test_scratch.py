"""Temporary data lives under one root and is gone after the block, Ctrl-C, or a kill."""

import os
import signal
import subprocess
import sys
import time

import pytest

from specmoe.storage.scratch import SCRATCH_ENV, scratch_dir, scratch_root, sweep_stale


def test_the_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "mine"))
    assert scratch_root() == tmp_path / "mine"
    monkeypatch.delenv(SCRATCH_ENV)
    assert scratch_root().name == f"specmoe-{os.getuid()}"


def test_removed_after_the_block_and_after_an_exception(tmp_path):
    with scratch_dir("unit", root=tmp_path) as tmp:
        (tmp / "big").write_bytes(b"x" * 1000)
        assert tmp.parent == tmp_path
    assert not tmp.exists()
    with pytest.raises(KeyboardInterrupt), scratch_dir("unit", root=tmp_path) as tmp:
        raise KeyboardInterrupt
    assert not tmp.exists()


KILLED = """
import sys, time
from specmoe.storage.scratch import scratch_dir
with scratch_dir("killed", root=sys.argv[1]) as tmp:
    (tmp / "copy").write_bytes(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_a_killed_owners_directory_is_removed_by_the_next_start_and_a_live_ones_kept(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    victim = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    alive = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        left, kept = victim.stdout.readline().strip(), alive.stdout.readline().strip()
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert os.path.isdir(left)  # a kill runs no cleanup
        assert sweep_stale(tmp_path) == []  # too young: it might be a directory being set up
        for directory in (left, kept):
            os.utime(directory, (time.time() - 60, time.time() - 60))
        assert [str(p) for p in sweep_stale(tmp_path)] == [left]
        assert not os.path.exists(left) and os.path.isdir(kept)
    finally:
        alive.kill()
        alive.wait()
