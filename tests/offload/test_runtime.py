"""The offload runtime computes exactly what the resident model computes, for every
fast-tier size down to one expert, with or without (even wrong) prefetching."""

import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import wrap_model
from specmoe.offload.runtime import OffloadRuntime
from specmoe.predictors.base import ExpertPredictor
from tests.tiny_models import VOCAB, tiny_model

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"]


class RandomPredictor(ExpertPredictor):
    """Confidently wrong on purpose: prefetches random experts."""

    name = "random-test"

    def predict_proba(self, context):
        return torch.rand(len(context), self.horizons, context.num_experts)


def _resident(model_type):
    model = tiny_model(model_type)
    model.config._experts_implementation = "eager"
    return model


def _expert_bytes(model_type):
    loaded = wrap_model(model_type, tiny_model(model_type))
    return sum(p.numel() * p.element_size() for p in loaded.adapter.expert_parameters(loaded.layers[0], 0))


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("slots", [1, 5, 64])
def test_generation_matches_resident_model(model_type, slots, tmp_path):
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    resident = _resident(model_type)
    with torch.no_grad():
        expected_logits = resident(prompt).logits
        expected = resident.generate(prompt, max_new_tokens=6, do_sample=False)
    budget = slots * _expert_bytes(model_type)
    predictor = RandomPredictor(horizons=2) if slots == 5 else None
    runtime = OffloadRuntime(
        wrap_model(model_type, tiny_model(model_type)), tmp_path / "experts", budget, predictor=predictor, lookahead=2
    )
    model = runtime.loaded.model
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(prompt).logits, expected_logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    finally:
        runtime.close()
    assert 0 < runtime.stats.peak_bytes <= budget
    assert runtime.stats.misses > 0
    if predictor is not None:
        assert runtime.stats.prefetch_requests > 0


def test_resident_expert_weights_are_freed(tmp_path):
    loaded = wrap_model("olmoe", tiny_model("olmoe"))
    before = sum(p.numel() for p in loaded.model.parameters())
    runtime = OffloadRuntime(loaded, tmp_path / "e", 10 * _expert_bytes("olmoe"))
    after = sum(p.numel() for p in loaded.model.parameters())
    runtime.close()
    # 2 MoE layers x 8 experts x (gate_up 2F x D + down D x F), F = 16, D = 32
    assert before - after == 2 * 8 * (2 * 16 * 32 + 32 * 16)


def test_budget_below_one_expert_and_unsupported_family_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="smaller than one expert"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), tmp_path / "a", 10)
    with pytest.raises(InputError, match="single-stack"):
        OffloadRuntime(wrap_model("switch", tiny_model("switch_transformers")), tmp_path / "b", 10**6)
    with pytest.raises(InputError, match="not supported yet"):
        OffloadRuntime(wrap_model("jet", tiny_model("jetmoe")), tmp_path / "c", 10**6)


def test_predictor_for_another_model_is_refused(tmp_path):
    predictor = RandomPredictor(horizons=1)
    predictor.fitted_meta = lambda: {"num_layers": 6, "num_experts": 128}
    with pytest.raises(InputError, match="fitted for 6 MoE layers x 128 experts"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), tmp_path / "e", 10**6, predictor=predictor)
