import json

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


@pytest.fixture(scope="session")
def hidden_store(tiny_checkpoints, tmp_path_factory):
    """Traces of the tiny OLMoE model with router inputs and residual streams."""
    from specmoe.traces.collector import CollectConfig, collect

    corpus = tmp_path_factory.mktemp("c") / "c.jsonl"
    corpus.write_text(
        "\n".join(
            json.dumps({"id": f"d{i}", "text": f"Text number {i}. " + "a quick fox " * (20 + i)}) for i in range(30)
        )
    )
    return collect(
        CollectConfig(
            model=str(tiny_checkpoints["olmoe"]),
            texts=[str(corpus)],
            out=tmp_path_factory.mktemp("t") / "traces",
            seq_len=32,
            save_router_inputs=True,
            save_residuals=True,
            progress=False,
        )
    )
