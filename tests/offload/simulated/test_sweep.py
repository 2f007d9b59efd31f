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


def test_policies_with_a_predictor_run_with_the_one_named_or_each_and_with_its_calibration(tmp_path):
    from specmoe.predictors.calibration import fit_calibration
    from specmoe.predictors.data import TraceDataset
    from specmoe.predictors.registry import make_predictor
    from tests.predictors.synthetic import make_synthetic_store

    store = make_synthetic_store(tmp_path / "s", num_layers=4, num_experts=16, top_k=2, noise=0.2)
    train = TraceDataset(store, "train")
    predictors = {"a": make_predictor("token", horizons=3).fit(train), "b": make_predictor("transition").fit(train)}
    calibrations = {"a": fit_calibration(predictors["a"], TraceDataset(store, "val"))}
    sweep = SweepSettings(
        cache_fractions=(0.25,),
        batch_sizes=(1, 3),
        max_windows=6,
        cache_policies=("lru",),
        predictor_policies=("cost-aware+next-use:a", "next-use", "mixtral-offloading:b"),
    )
    report = run_sweep(
        store.directory, preset("nvme"), 4096, predictors, sweep, calibrations=calibrations, progress=False
    )
    runs = [(r["batch_size"], r["policy"], r["predictor"]) for r in report["rows"]]
    expected = [
        "on-demand",
        "lru",
        "cost-aware+next-use:a",
        "next-use:a",
        "next-use:b",
        "mixtral-offloading:b",
        "oracle",
    ]
    for batch in (1, 3):
        assert [f"{p}:{n}" if n else p for b, p, n in runs if b == batch] == expected
    assert all(0 < r["peak_fast_tier_bytes"] <= r["config"]["capacity_bytes"] for r in report["rows"])
    by_run = {(r["batch_size"], r["policy"]): r for r in report["rows"]}
    assert by_run[1, "cost-aware+next-use"]["prefetch_loads"] > 0  # it read ahead
    assert by_run[1, "mixtral-offloading"]["eviction"] == "lru-per-layer"
    for batch in (1, 3):  # the measure: LRU's stall above the oracle's, removed
        lru, oracle, policy = (by_run[batch, p] for p in ("lru", "oracle", "cost-aware+next-use"))
        assert (lru["lru_gap_closed"], oracle["lru_gap_closed"]) == (0.0, 1.0)
        share = (lru["stall_s"] - policy["stall_s"]) / (lru["stall_s"] - oracle["stall_s"])
        assert policy["lru_gap_closed"] == pytest.approx(share)
    with pytest.raises(InputError, match="--predictor-policies prefetch:c: no --predictor-dir is called 'c'"):
        run_sweep(store.directory, preset("nvme"), 4096, predictors, SweepSettings(predictor_policies=("prefetch:c",)))
