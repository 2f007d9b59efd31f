"""The shipped built-in models: load by name through the Hugging Face path, right shape,
small enough, and routing that was learned (not random)."""

import numpy as np
import pytest
import torch

from specmoe.models.builtin.specs import BUILTIN_SPECS
from specmoe.models.loading import load_model
from specmoe.traces.batches import run_batch
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.stats import _mutual_information_bits
from specmoe.traces.windows import limit_tokens, plan_windows

# stacks, experts, top-k, and the least mutual information between consecutive layers' top-1
# choices, in bits, over 4096 tokens (fewer experts carry fewer bits: mixtral-32e's layers 6-7
# share 0.26)
EXPECTED = {
    "switch-128e": ({"encoder": 6, "decoder": 1}, 128, 1, 0.5),
    "olmoe-64e": ({"decoder": 8}, 64, 8, 0.5),
    "mixtral-32e": ({"decoder": 8}, 32, 2, 0.2),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def builtin(request):
    return load_model(request.param)


def test_checkpoint_is_small_and_shaped_as_documented(builtin):
    stacks, num_experts, top_k, _ = EXPECTED[builtin.model_id]
    assert builtin.stacks == stacks and builtin.num_experts == num_experts and builtin.top_k == top_k
    size = sum(p.stat().st_size for p in BUILTIN_SPECS[builtin.model_id].path.iterdir())
    assert size <= 40 * 2**20


def test_routing_is_learned_not_random(builtin):
    """Consecutive layers' top-1 choices share far more information than after shuffling
    one layer's tokens (which keeps both marginals and destroys only the pairing)."""
    windows = list(limit_tokens(plan_windows(["builtin"], builtin.tokenizer, 128), 4096))
    with RoutingRecorder(builtin) as recorder:
        chunks = [
            run_batch(builtin, recorder, windows[i : i + 8], builtin.tokenizer.pad_token_id or 0)
            for i in range(0, len(windows), 8)
        ]
    min_bits = EXPECTED[builtin.model_id][3]
    stack = next(iter(builtin.stacks))
    rng = np.random.default_rng(0)
    for layer in range(builtin.stacks[stack] - 1):
        src = torch.cat([rec[(stack, layer)].expert_ids[keep, 0] for rec, keep in chunks]).numpy()
        dst = torch.cat([rec[(stack, layer + 1)].expert_ids[keep, 0] for rec, keep in chunks]).numpy()
        ok = (src >= 0) & (dst >= 0)
        src, dst = src[ok], dst[ok]
        e = builtin.num_experts
        joint = np.zeros((e, e))
        np.add.at(joint, (src, dst), 1)
        shuffled = np.zeros((e, e))
        np.add.at(shuffled, (src, rng.permutation(dst)), 1)
        real, null = _mutual_information_bits(joint), _mutual_information_bits(shuffled)
        assert real > 2 * null and real > min_bits, f"layer {layer}: MI {real:.3f} bits vs shuffled {null:.3f}"
        chosen = torch.cat([rec[(stack, layer + 1)].expert_ids[keep] for rec, keep in chunks]).reshape(-1).numpy()
        used = np.bincount(chosen[chosen >= 0], minlength=e)
        assert (used > 0).sum() > e // 4, f"layer {layer + 1}: routing collapsed onto few experts"
