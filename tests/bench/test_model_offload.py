"""`specmoe bench offload --model`: every variant decodes the checkpoint in a process of its own
and reports tokens/s with its spread; a variant the memory limit kills is reported as such."""

import pytest

from specmoe.bench.model_offload import _cgroups, benchmark_model_offload, model_table
from specmoe.bench.settings import ModelBenchSettings
from specmoe.errors import InputError
from specmoe.settings import validated


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from specmoe.models.random_checkpoint import write_random_checkpoint

    shape = {"num_hidden_layers": 2, "num_experts": 8, "hidden_size": 64, "intermediate_size": 64}
    shape |= {"vocab_size": 8192, "num_attention_heads": 2, "num_key_value_heads": 2}
    return write_random_checkpoint("olmoe", tmp_path_factory.mktemp("m") / "ckpt", overrides=shape, progress=False)


def test_each_variant_decodes_in_a_process_of_its_own(checkpoint, tmp_path):
    settings = validated(
        ModelBenchSettings,
        {"variants": ("resident", "mmap", "lru", "oracle"), "tokens": 3, "warmup": 1, "repeats": 1,
         "memory_limit": "none"},
    )
    report = benchmark_model_offload(str(checkpoint), settings, store=tmp_path / "store")
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"resident", "mmap", "lru", "oracle"} and not any(r["failed"] for r in rows.values())
    assert all(r["tokens"] == 3 and len(r["tokens_per_s_all_repeats"]) == 1 for r in rows.values())
    assert rows["lru"]["peak_fast_tier_bytes"] <= rows["lru"]["fast_tier_bytes"]
    assert rows["oracle"]["hit_rate"] >= rows["lru"]["hit_rate"]  # it prefetched the recorded routing
    assert "resident" in model_table(report)


def test_prefetch_without_a_predictor_and_unknown_variants_are_refused(checkpoint):
    with pytest.raises(InputError, match="--policies prefetch needs a --predictor-dir"):
        benchmark_model_offload(str(checkpoint), ModelBenchSettings(variants=("prefetch",)))
    with pytest.raises(InputError, match="--variants: unknown fifo; variants: resident, accelerate, mmap"):
        validated(ModelBenchSettings, {"variants": ("fifo",)})


@pytest.mark.skipif(not _cgroups(), reason="no writable memory cgroup (cgroup v1 memory controller) here")
def test_a_variant_over_the_memory_limit_is_reported_killed(checkpoint, tmp_path):
    settings = validated(
        ModelBenchSettings, {"variants": ("mmap",), "tokens": 2, "warmup": 1, "repeats": 1, "memory_limit": "64MiB"}
    )
    row = benchmark_model_offload(str(checkpoint), settings, store=tmp_path / "store")["rows"][0]
    assert row["failed"] == ["killed: over the memory limit"] and "tokens_per_s" not in row
