"""The measured fast tier: a prefetch whose layer ran without it is evicted first, and
requests for a layer that has run are dropped before they cost a read."""

import threading

import torch

from specmoe.offload.fast_tier import FastTier, Prefetcher, RuntimeStats, finish_layer
from specmoe.offload.tiers import HostExperts, Loaded, Transfer


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


class _GatedExperts(HostExperts):
    """Reads block until the test opens the gate, so the prefetch queue can be inspected."""

    def __init__(self):
        super().__init__({layer: [[torch.zeros(4)]] * 4 for layer in range(3)})
        self.gate = threading.Event()
        self.reading = threading.Event()

    def read(self, layer, expert):
        self.reading.set()
        self.gate.wait(5)
        return super().read(layer, expert)


def test_requests_for_a_layer_that_ran_are_dropped_unread():
    slow = _GatedExperts()
    stats = RuntimeStats()
    tier = FastTier(10**6, stats)
    prefetcher = Prefetcher(Transfer(slow), tier, stats)
    try:
        prefetcher.request([(1, 0), (2, 0), (2, 1)])
        assert slow.reading.wait(5)  # (1, 0) is being read; the rest wait in the queue
        finish_layer(tier, prefetcher, 2)
        assert not prefetcher.queue and set(prefetcher.in_flight) == {(1, 0)}
        slow.gate.set()
        assert prefetcher.wait_for((1, 0))
    finally:
        prefetcher.close()
    assert (1, 0) in tier and (2, 0) not in tier and (2, 1) not in tier
    assert stats.prefetch_requests == 3 and stats.prefetch_reads == 1
