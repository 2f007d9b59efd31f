"""A store's shards are a Parquet dataset: DuckDB, polars, pandas and Hugging Face datasets
read them as they are, and the example queries agree with ``specmoe traces info``."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from specmoe.cli import app
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.query import query_text, run_query

pytest.importorskip("duckdb")
runner = CliRunner()


@pytest.fixture(scope="module")
def switch_store(tmp_path_factory):
    """The built-in Switch model (top-1, an encoder and a decoder stack, tokens dropped over
    capacity) over the built-in corpus, in several shards."""
    out = tmp_path_factory.mktemp("switch") / "traces"
    return collect(CollectConfig(model="switch-128e", texts=["builtin"], out=out, max_tokens=1500, windows_per_shard=4))


@pytest.fixture(scope="module")
def top2_store(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("olmoe") / "traces"
    return collect(
        CollectConfig(
            model=str(tiny_checkpoints["olmoe"]),
            texts=["builtin"],
            out=out,
            max_tokens=1500,
            seq_len=64,
            progress=False,
        )
    )


def _info(store) -> dict:
    result = runner.invoke(app, ["traces", "info", str(store.directory), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _query(store, name: str, **variables) -> list[tuple]:
    columns, rows = run_query(store.directory, query_text(name), variables)
    assert columns[-1] == "tokens"
    return rows


@pytest.mark.parametrize("which", ["switch_store", "top2_store"])
def test_expert_usage_query_counts_what_traces_info_counts(which, request):
    store = request.getfixturevalue(which)
    info = _info(store)
    counted = {}
    for stack, layer, expert, tokens in _query(store, "expert_usage"):
        counted.setdefault(stack, np.zeros((info["stacks"][stack], info["num_experts"]), dtype=int))
        counted[stack][layer, expert] = tokens
    assert set(counted) == set(info["stacks"])
    for stack, stats in info["statistics"].items():
        assert np.array_equal(counted[stack], np.array(stats["usage_counts"]))


def _mutual_information_bits(joint: np.ndarray) -> float:
    p = joint / joint.sum()
    outer = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    return float(sum(p[i, j] * math.log2(p[i, j] / outer[i, j]) for i, j in zip(*np.nonzero(p))))


@pytest.mark.parametrize("which", ["switch_store", "top2_store"])
def test_coactivation_of_top_choices_gives_the_next_layer_statistics_of_traces_info(which, request):
    store = request.getfixturevalue(which)
    info = _info(store)
    experts = info["num_experts"]
    checked = 0
    for stack, stats in info["statistics"].items():
        for row in stats["layers"][:-1]:
            joint = np.zeros((experts, experts))
            for a, b, tokens in _query(store, "coactivation", stack=stack, layer_a=row["layer"], top=1):
                joint[a, b] = tokens
            assert round(joint.max(1).sum() / joint.sum(), 4) == row["next_layer_top1_acc"]
            assert round(_mutual_information_bits(joint), 4) == pytest.approx(row["next_layer_mi_bits"], abs=1e-4)
            checked += 1
    assert checked >= 1


def test_coactivation_of_all_choices_pairs_each_choice_with_every_choice_of_the_other_layer(top2_store):
    info = _info(top2_store)
    k, usage = info["top_k"], np.array(info["statistics"]["decoder"]["usage_counts"])
    pairs = _query(top2_store, "coactivation", layer_a=0, layer_b=1)
    from_a = np.zeros(info["num_experts"], dtype=int)
    for a, _b, tokens in pairs:
        from_a[a] += tokens
    assert k == 2 and np.array_equal(from_a, k * usage[0])  # no drops in OLMoE: k partners each


def test_every_reader_sees_the_rows_of_the_store_in_order(switch_store, tmp_path):
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    shards = [switch_store.read_shard(i, "encoder") for i in range(len(switch_store.manifest.shards))]
    tokens = np.concatenate([s.token_ids for s in shards])
    experts = np.concatenate([s.expert_ids.reshape(len(s), -1) for s in shards])
    files = sorted(str(p) for p in switch_store.directory.glob("shard-*.parquet"))
    pattern = str(switch_store.directory / "shard-*.parquet")
    column = "encoder.expert_ids"

    read = {
        "duckdb": duckdb.sql(f"SELECT token_id, \"{column}\" FROM read_parquet('{pattern}')").fetchnumpy(),
        "polars": pl.read_parquet(pattern).select("token_id", column).to_dict(as_series=False),
        "pandas": pd.read_parquet(files, columns=["token_id", column]),
        "datasets": datasets.load_dataset(
            "parquet", data_files=pattern, split="train", cache_dir=str(tmp_path / "hf")
        ).select_columns(["token_id", column])[:],
    }
    assert len(shards) > 1
    for reader, table in read.items():
        assert np.array_equal(np.asarray(table["token_id"]), tokens), reader
        assert np.array_equal(np.stack([np.asarray(x) for x in table[column]]), experts), reader


def test_query_command_prints_a_shipped_query_and_refuses_unknown_ones(top2_store):
    result = runner.invoke(app, ["traces", "query", str(top2_store.directory), "expert_usage", "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "stack,layer,expert,tokens"
    result = runner.invoke(app, ["traces", "query", str(top2_store.directory), "popularity"])
    assert result.exit_code != 0 and "expert_usage" in str(result.exception)
