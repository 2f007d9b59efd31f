"""Loading a model without its routed experts: every other tensor is the one from_pretrained
loads, every expert read from the checkpoint (or the store made from it) is the resident
model's, and the offloaded model generates exactly what the resident one does, down to a
fast tier of one expert, for every family the runtime runs."""

import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.models.offloaded import load_offloaded
from specmoe.offload.live.expert_store import CheckpointExperts, prepare_store
from specmoe.offload.live.runtime import OffloadRuntime
from tests.tiny_models import VOCAB, save_tiny_checkpoint

RUNTIME_FAMILIES = [
    "olmoe",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
    "phimoe",
    "granitemoe",
    "dbrx",
    "switch_transformers",
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-checkpoints")
    return {family: save_tiny_checkpoint(family, root / family) for family in RUNTIME_FAMILIES}


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
def test_every_tensor_is_the_one_from_pretrained_loads(checkpoints, family):
    resident = load_model(str(checkpoints[family]))
    offloaded = load_offloaded(str(checkpoints[family]), progress=False)
    assert offloaded.dtype == torch.float32  # the checkpoint's own
    expected = resident.model.state_dict()
    held = {name: t for name, t in offloaded.loaded.model.state_dict().items() if not t.is_meta}
    assert held and all(torch.equal(t, expected[name]) for name, t in held.items())
    for g, layer in enumerate(resident.layers):
        for e in (0, resident.num_experts - 1):
            want = resident.adapter.expert_parameters(layer, e)
            assert all(torch.equal(a, b) for a, b in zip(offloaded.expert_tensors(g, e), want, strict=True))
    routed = sum(
        p.numel()
        for g, layer in enumerate(resident.layers)
        for e in range(resident.num_experts)
        for p in resident.adapter.expert_parameters(layer, e)
    )
    assert sum(t.numel() for t in expected.values()) - sum(t.numel() for t in held.values()) >= routed


@pytest.mark.parametrize("family", RUNTIME_FAMILIES)
@pytest.mark.parametrize("slots", [1, 5])
def test_generation_from_the_store_matches_the_resident_model(checkpoints, family, slots, tmp_path):
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(str(checkpoints[family])).model.generate(prompt, max_new_tokens=5, do_sample=False)
    offloaded = load_offloaded(str(checkpoints[family]), progress=False)
    sources = {"store": prepare_store(offloaded, tmp_path / "store", progress=False, log=lambda _: None)}
    if offloaded.expert_ranges(0, 0) is not None:
        sources["checkpoint"] = CheckpointExperts(offloaded)
    for kind, experts in sources.items():
        offloaded = load_offloaded(str(checkpoints[family]), progress=False)
        runtime = OffloadRuntime(offloaded.loaded, slots * offloaded.expert_nbytes(0), experts=experts)
        try:
            with torch.no_grad():
                out = offloaded.loaded.model.generate(prompt, max_new_tokens=5, do_sample=False)
        finally:
            runtime.close()
        assert torch.equal(out, expected), kind
        assert 0 < runtime.stats.peak_bytes <= slots * offloaded.expert_nbytes(0)


def test_experts_stored_as_the_model_holds_them_are_read_straight_from_the_checkpoint(checkpoints):
    # transformers saves Mixtral's experts one tensor each (w1, w3 fused into gate_up at load):
    # expert e's gate_up is w1[e] and w3[e] back to back
    offloaded = load_offloaded(str(checkpoints["mixtral"]), progress=False)
    ranges = offloaded.expert_ranges(1, 3)
    assert [[part.path.name for part in parts] for parts in ranges] == [
        ["model.safetensors"] * 2,
        ["model.safetensors"],
    ]
    # another dtype needs converting: only a store can hold it
    halved = load_offloaded(str(checkpoints["mixtral"]), dtype="bfloat16", progress=False)
    assert halved.expert_ranges(1, 3) is None
    with pytest.raises(InputError, match="write an expert store with `specmoe prepare`"):
        CheckpointExperts(halved)


def test_a_quantized_or_incomplete_checkpoint_is_refused_with_its_reason(checkpoints, tmp_path):
    import json
    import shutil

    quantized = shutil.copytree(checkpoints["olmoe"], tmp_path / "quantized")
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(InputError, match="is quantized \\(mxfp4\\)"):
        load_offloaded(str(quantized), progress=False)
    cut = shutil.copytree(checkpoints["olmoe"], tmp_path / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(InputError, match="model.safetensors: truncated .*download it again"):
        load_offloaded(str(cut), progress=False)
