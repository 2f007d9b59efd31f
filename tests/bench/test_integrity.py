"""The verification benchmark measures its three variants on a real store and leaves it usable."""

from specmoe.bench.integrity import benchmark_verification
from specmoe.traces.store import TraceStore
from tests.predictors.synthetic import make_synthetic_store


def test_benchmark_reports_every_variant_with_its_spread(tmp_path):
    store = make_synthetic_store(tmp_path / "s", num_docs=16)
    report = benchmark_verification(store.directory, repeats=2)
    assert set(report["passes"]) == {"unchecked", "checked", "first_read"}
    for variant in report["passes"].values():
        assert len(variant["runs_s"]) == 2 and variant["min_s"] <= variant["median_s"] <= variant["max_s"]
    assert report["bytes"]["routing"] == sum(s.routing.bytes for s in store.manifest.shards)
    assert TraceStore.open(store.directory, verify_checksums=True).read_shard(0) is not None


def test_consumer_overhead_times_both_read_paths(tmp_path):
    from specmoe.bench.integrity import consumer_overhead

    store = make_synthetic_store(tmp_path / "s", num_docs=16)
    result = consumer_overhead(store.directory, ["popularity"], repeats=1)
    assert set(result["popularity"]) == {"unchecked", "checked", "overhead_fraction"}
