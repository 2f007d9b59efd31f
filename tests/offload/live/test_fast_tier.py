"""The measured fast tier: a prefetch whose layer ran without it is evicted first, LFU
does not count a prefetch as a use, and LRFU decays with decoding positions."""

import torch

from specmoe.offload.live.fast_tier import FastTier, RuntimeStats
from specmoe.offload.live.tiers import Loaded


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
    tier.residency.finish_layer(1)  # layer 1 ran without expert 5
    tier.put((2, 1), _loaded(), 16, prefetch=False)
    assert (1, 5) not in tier and (0, 1) in tier
    assert tier.residency.wasted_prefetches == 1 and stats.peak_bytes == 3 * 16


def test_lfu_does_not_count_a_prefetch_as_a_use():
    tier = FastTier(2 * 16, RuntimeStats(), "lfu")
    tier.put((0, 0), _loaded(), 16, prefetch=False)
    tier.put((1, 0), _loaded(), 16, prefetch=True)
    assert tier.policy.count[(1, 0)] == 0 and tier.policy.count[(0, 0)] == 1


def test_lrfu_measures_its_decay_in_decoding_positions():
    tier = FastTier(2 * 16, RuntimeStats(), "lrfu", num_layers=4)  # half-life: 16 tokens of 4 layers
    for step in range(3):  # expert (0, 0) used by three tokens in a row
        tier.residency.position = 4 * step
        tier.put((0, 0), _loaded(), 16, prefetch=False) if step == 0 else tier.get((0, 0))
    tier.residency.position = 4 * 200  # long after: one use now outweighs the three then
    tier.put((1, 0), _loaded(), 16, prefetch=False)
    tier.residency.position += 1
    tier.put((2, 0), _loaded(), 16, prefetch=False)
    assert (0, 0) not in tier and (1, 0) in tier
