"""Each adapter, on a tiny random model: the recorded selection is what the experts received."""

import pytest
import torch

from specmoe.errors import UnsupportedModelError
from specmoe.models.loading import wrap_model
from specmoe.models.registry import adapter_for, supported_model_types
from specmoe.traces.recorder import RoutingRecorder
from tests.tiny_models import TINY_MODEL_TYPES, VOCAB, tiny_model

# Families whose MoE block output is exactly experts(x, ids, weights): no shared expert, bias
# or dense-score trick around it, so the recorded weights can be checked by recomputation.
PLAIN_BLOCKS = {"mixtral", "qwen3_moe", "olmoe", "gpt_oss", "phimoe", "granitemoe", "dbrx"}


def _run(loaded, input_ids):
    outputs = {}
    hooks = [
        layer.block.register_forward_hook(
            lambda _m, _a, out, key=(layer.stack, layer.layer_idx): outputs.__setitem__(
                key,
                (out[0] if isinstance(out, tuple) else out)
                .detach()
                .reshape(-1, out[0].shape[-1] if isinstance(out, tuple) else out.shape[-1])
                .clone(),
            )
        )
        for layer in loaded.layers
    ]
    with torch.no_grad(), RoutingRecorder(loaded, router_inputs=True) as recorder:
        loaded.adapter.forward(loaded.model, input_ids, torch.ones_like(input_ids))
        records = recorder.pop()
    for hook in hooks:
        hook.remove()
    return records, outputs


@pytest.fixture(params=TINY_MODEL_TYPES)
def loaded(request):
    return wrap_model(request.param, tiny_model(request.param))


def test_shapes_and_sorted_weights(loaded):
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    records, _ = _run(loaded, input_ids)
    assert set(records) == {(layer.stack, layer.layer_idx) for layer in loaded.layers}
    for record in records.values():
        assert record.expert_ids.shape == (32, loaded.top_k)
        assert record.router_input.shape[0] == 32
        kept = record.expert_ids >= 0
        assert ((record.expert_ids < loaded.num_experts) & (record.expert_ids >= -1)).all()
        assert (record.gate_weights[~kept] == 0).all()
        assert (record.gate_weights[:, :-1] >= record.gate_weights[:, 1:]).all(), "not sorted by weight"
        for row in record.expert_ids:
            chosen = row[row >= 0]
            assert len(chosen.unique()) == len(chosen), "an expert selected twice for one token"


def test_silencing_an_expert_changes_exactly_the_tokens_recorded_for_it(loaded):
    """Ground truth independent of the hooks: zero one expert's weights and see which
    tokens' MoE-block outputs move. They must be the tokens recorded as routed to it."""
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    records, baseline = _run(loaded, input_ids)
    for layer in loaded.layers:
        key = (layer.stack, layer.layer_idx)
        ids = records[key].expert_ids
        for expert in ids[ids >= 0].unique()[:3].tolist():
            params = loaded.adapter.expert_parameters(layer, expert)
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.zero_()
            _, ablated = _run(loaded, input_ids)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            moved = (ablated[key] - baseline[key]).abs().amax(-1) > 1e-6
            routed = (ids == expert).any(-1)
            assert torch.equal(moved, routed), (
                f"{key} expert {expert}: moved {moved.nonzero().flatten().tolist()}"
                f" vs recorded {routed.nonzero().flatten().tolist()}"
            )


def test_recorded_weights_reproduce_the_block_output(loaded):
    if loaded.model_type not in PLAIN_BLOCKS:
        pytest.skip("block adds shared experts / biases around the experts call")
    input_ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    records, outputs = _run(loaded, input_ids)
    for layer in loaded.layers:
        record = records[(layer.stack, layer.layer_idx)]
        weights = record.gate_weights.to(record.router_input.dtype)
        with torch.no_grad():
            expected = layer.block.experts(record.router_input, record.expert_ids, weights)
        torch.testing.assert_close(
            expected.reshape(outputs[(layer.stack, layer.layer_idx)].shape),
            outputs[(layer.stack, layer.layer_idx)],
            rtol=1e-5,
            atol=1e-5,
        )


def test_switch_records_capacity_drops_as_minus_one():
    loaded = wrap_model("switch", tiny_model("switch_transformers"))
    assert loaded.stacks == {"encoder": 2, "decoder": 1}
    input_ids = torch.full((1, 16), 5)  # identical tokens all pick one expert: capacity 3
    records, _ = _run(loaded, input_ids)
    ids = records[("encoder", 0)].expert_ids[:, 0]
    assert (ids >= 0).sum() == 3 and (ids == -1).sum() == 13


def test_dense_layers_are_not_counted():
    loaded = wrap_model("ds", tiny_model("deepseek_v3"))  # first_k_dense_replace=1 of 3 layers
    assert [layer.name for layer in loaded.layers] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert [layer.layer_idx for layer in loaded.layers] == [0, 1]


def test_deepseek_v3_records_biased_group_limited_choice_not_plain_topk():
    loaded = wrap_model("ds", tiny_model("deepseek_v3"))
    input_ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(4))
    records, _ = _run(loaded, input_ids)
    layer = loaded.layers[0]
    router = layer.block.gate
    with torch.no_grad():
        logits = torch.nn.functional.linear(records[("decoder", 0)].router_input.float(), router.weight.float())
    plain = torch.topk(logits.sigmoid(), 2, dim=-1).indices.sort(-1).values
    recorded = records[("decoder", 0)].expert_ids.sort(-1).values
    assert not torch.equal(plain, recorded), "correction bias / group limit had no effect in this test"


def test_unknown_model_type_lists_supported_ones():
    with pytest.raises(UnsupportedModelError, match="supported: .*mixtral"):
        adapter_for("llama")
    assert {*TINY_MODEL_TYPES, "llama4"} <= set(supported_model_types())
