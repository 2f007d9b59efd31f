import pytest

from specmoe.predictors.data import TraceDataset
from tests.predictors.synthetic import make_synthetic_store


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("synthetic") / "traces", noise=0.05)


@pytest.fixture(scope="session")
def synthetic_splits(synthetic_store):
    train = TraceDataset(synthetic_store, "train", seed=0)
    return train, train.with_split("val"), train.with_split("test")
