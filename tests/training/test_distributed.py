"""`torchrun` with two CPU processes (gloo): the same command trains with DDP, unchanged."""

import json
import os
import subprocess
import sys

import pytest

from tests.predictors.synthetic import make_synthetic_store

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed beside this python")
def test_torchrun_two_processes(tmp_path):
    make_synthetic_store(tmp_path / "traces", noise=0.05)
    torchrun = TORCHRUN
    proc = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "specmoe",
            "train",
            "--predictor",
            "interlayer",
            "--preset",
            "small",
            "--traces",
            str(tmp_path / "traces"),
            "--out",
            str(tmp_path / "p"),
            "--epochs",
            "2",
            "--max-steps-per-epoch",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved interlayer") == 1  # rank 0 alone writes
    assert json.loads((tmp_path / "p" / "training_summary.json").read_text())["epochs_run"] == 2
