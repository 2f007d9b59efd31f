"""``--device-map``: accelerate spreads a model over devices and the hooks still record every
layer. Here the devices are CPU memory and disk (a tiny budget pushes the second layer to
disk, whose weights accelerate loads on the fly); on a GPU machine they are GPUs."""

import numpy as np
import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.models.placement import load_kwargs, parse_max_memory, process_gpus
from specmoe.traces.collector import CollectConfig, collect

pytest.importorskip("accelerate")

# The tiny OLMoE holds about 200 kB of fp32 weights: this budget keeps the embedding and
# layer 0 in memory and sends layer 1, the final norm and the LM head to disk.
SPLIT = {"device_map": "auto", "max_memory": "cpu=200KB"}


def test_a_model_split_over_memory_and_disk_records_the_routing_of_a_one_device_run(
    tiny_checkpoints, small_corpus, tmp_path
):
    checkpoint = str(tiny_checkpoints["olmoe"])
    split = load_model(checkpoint, **load_kwargs("auto", **SPLIT, offload_folder=tmp_path / "offload"))
    placed = split.model.hf_device_map
    assert placed["model.layers.0"] == "cpu" and placed["model.layers.1"] == "disk", placed

    settings = {"model": checkpoint, "texts": [str(small_corpus)], "seq_len": 16, "batch_size": 3, "progress": False}
    spread = collect(CollectConfig(**settings, out=tmp_path / "spread", offload_folder=tmp_path / "off", **SPLIT))
    plain = collect(CollectConfig(**settings, out=tmp_path / "plain", device="cpu"))
    assert spread.manifest.num_tokens == plain.manifest.num_tokens > 0
    for ours, theirs in zip(spread.iter_shards(), plain.iter_shards(), strict=True):
        assert np.array_equal(ours.expert_ids, theirs.expert_ids)
        assert np.allclose(ours.gate_weights, theirs.gate_weights, atol=1e-6)


def test_disk_placement_without_an_offload_folder_is_one_clear_error(tiny_checkpoints):
    with pytest.raises(InputError, match="--offload-folder"):
        load_model(str(tiny_checkpoints["olmoe"]), **load_kwargs("auto", **SPLIT, offload_folder=None))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"device_map": "everywhere"}, "unknown --device-map 'everywhere'; choose one of auto, balanced"),
        ({"max_memory": "cpu=1GiB"}, "apply to --device-map"),
        ({"device": "cuda:0", "device_map": "auto"}, "either --device"),
        ({"device": "gpu"}, "--device must be"),
        ({"device_map": "auto", "max_memory": "cpu=lots"}, "size must be bytes or a number with a unit"),
        ({"device_map": "auto", "max_memory": "cpu"}, "device=size"),
        ({"device_map": "auto", "max_memory": "7=1GiB"}, "unknown device '7'"),
    ],
)
def test_bad_placement_is_refused_before_loading(tmp_path, settings, message):
    with pytest.raises(InputError, match=message):
        CollectConfig(model="unused", texts=["builtin"], out=tmp_path, **settings)


def test_each_process_on_a_node_spreads_over_its_own_gpus():
    assert [process_gpus(8, rank, 2) for rank in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert process_gpus(0, 0, 2) == []
    with pytest.raises(InputError, match="at least one GPU per process"):
        process_gpus(2, 0, 4)
    assert parse_max_memory("gpu=1GiB,cpu=1000", [2, 3]) == {2: 2**30, 3: 2**30, "cpu": 1000}
    with pytest.raises(InputError, match="unknown device '0'"):
        parse_max_memory("0=1GiB", [2, 3])


@pytest.mark.gpu
def test_on_a_gpu_the_layers_run_there_and_the_routing_matches_cpu(tiny_checkpoints, small_corpus, tmp_path):
    settings = {
        "model": str(tiny_checkpoints["olmoe"]),
        "texts": [str(small_corpus)],
        "seq_len": 16,
        "progress": False,
    }
    gpu = collect(CollectConfig(**settings, out=tmp_path / "gpu", device_map="auto", max_memory="gpu=150KB,cpu=1GiB"))
    cpu = collect(CollectConfig(**settings, out=tmp_path / "cpu", device="cpu"))
    assert torch.cuda.is_available()
    for ours, theirs in zip(gpu.iter_shards(), cpu.iter_shards(), strict=True):
        assert (ours.expert_ids == theirs.expert_ids).mean() > 0.99  # GPU kernels round differently


def test_the_command_line_prints_an_unknown_device_map_as_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "specmoe", "collect", "--model", "olmoe-64e", "--text", "builtin"]
        + ["--out", str(tmp_path / "t"), "--device-map", "everywhere"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown --device-map 'everywhere'; choose one of auto, balanced, balanced_low_0, sequential"
    ]
    assert not (tmp_path / "t").exists()
