"""The simulation sweep: its oracle reads into the next token by default, as the measured
benchmark's does, and a reach the fast tier cannot honour is refused with the option's name."""

import pytest

from specmoe.errors import InputError
from specmoe.offload.cost import preset
from specmoe.offload.sweep import SweepConfig, run_sweep


def test_the_simulated_oracle_reaches_as_far_as_the_measured_one(finished_run):
    out, _ = finished_run
    layers_minus_one = run_sweep(
        out / "traces", preset("pcie4"), 4096, {}, SweepConfig(cache_fractions=(0.5,), max_windows=2), progress=False
    )
    assert layers_minus_one["oracle_lookahead"] == layers_minus_one["num_layers"] - 1
    assert {r["policy"] for r in layers_minus_one["rows"]} == {"on-demand", "cache", "oracle"}
    too_far = SweepConfig(cache_fractions=(0.5,), max_windows=2, oracle_lookahead=layers_minus_one["num_layers"])
    with pytest.raises(InputError, match=r"--oracle-lookahead must be in \[1, \d+\]"):
        run_sweep(out / "traces", preset("pcie4"), 4096, {}, too_far, progress=False)
