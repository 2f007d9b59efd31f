"""Document splits: deterministic, seeded, roughly 80/10/10, near-duplicates kept together."""

import numpy as np

from specmoe.traces.splits import assign_splits, near_duplicate_groups, split_of
from tests.predictors.synthetic import make_synthetic_store


def test_split_is_deterministic_seeded_and_proportional():
    keys = [f"doc{i}" for i in range(5000)]
    a = [split_of(k, 0) for k in keys]
    assert a == [split_of(k, 0) for k in keys]
    assert a != [split_of(k, 1) for k in keys]
    shares = {s: a.count(s) / len(a) for s in ("train", "val", "test")}
    assert abs(shares["train"] - 0.8) < 0.03 and abs(shares["val"] - 0.1) < 0.02 and abs(shares["test"] - 0.1) < 0.02


def test_near_duplicates_share_a_cluster_and_distinct_texts_do_not():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5000, 400)
    edited = base.copy()
    edited[::50] = 7  # a few tokens changed
    other = rng.integers(0, 5000, 400)
    groups = near_duplicate_groups({"a": base, "b": edited, "c": other})
    assert groups["a"] == groups["b"] != groups["c"]


def test_store_splits_follow_documents(tmp_path):
    store = make_synthetic_store(tmp_path / "s", num_docs=30)
    splits = assign_splits(store, seed=0)
    assert set(splits) == {f"doc{i}" for i in range(30)}
    assert set(splits.values()) <= {"train", "val", "test"}
