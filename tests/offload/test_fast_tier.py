"""The measured fast tier: a prefetch whose layer ran without it is evicted first, and LFU
does not count a prefetch as a use."""

import torch

from specmoe.offload.fast_tier import FastTier, RuntimeStats, finish_layer
from specmoe.offload.tiers import Loaded


def _loaded():
    return Loaded([torch.zeros(4)])


def test_an_expired_prefetch_is_evicted_before_older_cached_experts():
    stats = RuntimeStats()
    tier = FastTier(3 * 16, stats, "lru")
    tier.put((0, 0), _loaded(), 16, prefetch=False)
    tier.put((0, 1), _loaded(), 16, prefetch=False)
    tier.put((1, 5), _loaded(), 16, prefetch=True)
    tier.put((2, 0), _loaded(), 16, prefetch=False)  # before layer 1 ran: the oldest cached goes
    assert (0, 0) not in tier and (1, 5) in tier
    finish_layer(tier, None, 1)  # layer 1 ran without expert 5
    tier.put((2, 1), _loaded(), 16, prefetch=False)
    assert (1, 5) not in tier and (0, 1) in tier
    assert stats.wasted_prefetches == 1


def test_lfu_does_not_count_a_prefetch_as_a_use():
    tier = FastTier(2 * 16, RuntimeStats(), "lfu")
    tier.put((0, 0), _loaded(), 16, prefetch=False)
    tier.put((1, 0), _loaded(), 16, prefetch=True)
    assert tier.policy.count[(1, 0)] == 0 and tier.policy.count[(0, 0)] == 1
