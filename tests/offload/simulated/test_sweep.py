"""The simulation sweep: its oracle reads into the next token by default, as the measured
benchmark's does, and a reach the fast tier cannot honour is refused with the option's name."""

import pytest

from specmoe.errors import InputError
from specmoe.offload.policy import PrefetchSettings
from specmoe.offload.simulated.cost import preset
from specmoe.offload.simulated.settings import SweepSettings
from specmoe.offload.simulated.sweep import run_sweep


def test_the_simulated_oracle_reaches_as_far_as_the_measured_one(finished_run):
    out, _ = finished_run
    small = SweepSettings(cache_fractions=(0.5,), max_windows=2)
    report = run_sweep(out / "traces", preset("pcie4"), 4096, {}, small, progress=False)
    assert report["prefetch"]["oracle_reach"] == report["num_layers"] - 1
    assert [r["policy"] for r in report["rows"]] == ["on-demand", "lru", "lfu", "lrfu", "belady", "oracle"]
    assert all(r["peak_fast_tier_bytes"] <= r["config"]["capacity_bytes"] for r in report["rows"])
    too_far = small.model_copy(update={"prefetch": PrefetchSettings(oracle_reach=report["num_layers"])})
    with pytest.raises(InputError, match=r"--oracle-reach must be in \[1, \d+\]"):
        run_sweep(out / "traces", preset("pcie4"), 4096, {}, too_far, progress=False)


def test_a_prefetching_policy_is_not_a_cache_policy():
    with pytest.raises(ValueError, match="oracle: not a cache policy"):
        SweepSettings(cache_policies=("lru", "oracle"))
