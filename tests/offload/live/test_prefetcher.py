"""The prefetch thread: requests for a layer that has run are dropped before they cost a
read, a prefetch read pauses for a demand read, a newer plan replaces one not started, and a
failure on the thread reaches the decoder instead of hanging it."""

import threading
import time

import pytest
import torch

from specmoe.offload.live.fast_tier import FastTier, RuntimeStats
from specmoe.offload.live.prefetcher import Prefetcher
from specmoe.offload.live.tiers import HostExperts, Transfer
from specmoe.offload.policy import Forecast, in_token_requests


class _GatedExperts(HostExperts):
    """Reads block until the test opens the gate, so the prefetch queue can be inspected."""

    def __init__(self):
        super().__init__({layer: [[torch.zeros(4)]] * 4 for layer in range(3)})
        self.gate = threading.Event()
        self.reading = threading.Event()

    def read(self, layer, expert, between_chunks=None):
        self.reading.set()
        self.gate.wait(5)
        if between_chunks is not None:  # a read of two chunks
            between_chunks()
        return super().read(layer, expert)


@pytest.fixture
def gated():
    """A prefetcher over a slow tier whose reads wait for the test to open the gate."""
    slow, stats = _GatedExperts(), RuntimeStats()
    tier = FastTier(10**6, stats)
    prefetcher = Prefetcher(Transfer(slow), tier, stats)
    yield slow, stats, tier, prefetcher
    prefetcher.close()


def _eventually(condition) -> bool:
    for _ in range(500):
        if condition():
            return True
        time.sleep(0.01)
    return False


def _requests(keys):
    """Requests for layers of the first decode step (position = layer, 3 layers)."""
    return in_token_requests(keys, 0, 3)


def _forecast(keys, step=0):
    """A plan's forecast of ``keys`` in decode step ``step``, each certain."""
    return Forecast(0, tuple((key, position, 1.0) for key, position in in_token_requests(keys, step, 3)))


def test_requests_for_a_layer_that_ran_are_dropped_unread(gated):
    slow, stats, tier, prefetcher = gated
    prefetcher.request(_requests([(1, 0), (2, 0), (2, 1)]))
    assert slow.reading.wait(5)  # (1, 0) is being read; the rest wait in the queue
    prefetcher.finish_layer(2)  # the layer at position 2 has run
    assert not prefetcher.queue and set(prefetcher.in_flight) == {(1, 0)}
    slow.gate.set()
    assert prefetcher.wait_for((1, 0))
    assert (1, 0) in tier and (2, 0) not in tier and (2, 1) not in tier
    assert stats.prefetch_requests == 3 and stats.prefetch_reads == 1


def test_requests_a_starting_layer_does_not_need_are_dropped_and_the_needed_kept(gated):
    slow, _stats, _tier, prefetcher = gated
    prefetcher.request(in_token_requests([(1, 0), (2, 0), (2, 1), (3, 0)], 0, 4))
    assert slow.reading.wait(5)
    prefetcher.begin_layer(2, {(2, 1)})  # layer 2's routing: it needs expert 1, not 0
    assert list(prefetcher.queue.entries) == [((2, 1), 2), ((3, 0), 3)]
    slow.gate.set()


def test_a_prefetch_read_pauses_between_chunks_while_a_demand_read_runs(gated):
    slow, stats, tier, prefetcher = gated
    with prefetcher.demand_read():
        prefetcher.request(_requests([(1, 0)]))
        assert slow.reading.wait(5)
        slow.gate.set()  # its first chunk is read; the second must wait for the demand read
        _eventually(lambda: stats.prefetch_pauses)
        assert stats.prefetch_pauses >= 1 and (1, 0) not in tier
    assert prefetcher.wait_for((1, 0))
    assert (1, 0) in tier and stats.prefetch_reads == 1


def test_a_newer_plan_replaces_one_not_yet_started_and_plans_run_between_chunks(gated):
    slow, stats, tier, prefetcher = gated
    ran = []
    prefetcher.request(in_token_requests([(0, 0)], 1, 3))
    assert slow.reading.wait(5)  # the thread is inside a read: plans wait for its chunk boundary
    prefetcher.plan(lambda: ran.append("older") or _forecast([(1, 1)]))
    prefetcher.plan(lambda: ran.append("newer") or _forecast([(2, 2)]))
    slow.gate.set()
    assert prefetcher.wait_for((0, 0))
    _eventually(lambda: (2, 2) in tier)
    assert ran == ["newer"] and (2, 2) in tier and (1, 1) not in tier
    assert stats.plan_cpu_s > 0


def test_a_kept_plan_is_not_replaced_and_runs_after_the_latest_plan(gated):
    slow, _stats, tier, prefetcher = gated
    ran = []
    prefetcher.request(in_token_requests([(0, 0)], 1, 3))
    assert slow.reading.wait(5)
    prefetcher.plan(lambda: ran.append("next token") or _forecast([(0, 3)], 1), keep=True)
    prefetcher.plan(lambda: ran.append("older") or _forecast([(1, 1)]))
    prefetcher.plan(lambda: ran.append("newer") or _forecast([(2, 2)]))
    slow.gate.set()
    assert prefetcher.wait_for((0, 0))
    _eventually(lambda: (0, 3) in tier)
    assert ran == ["newer", "next token"] and (0, 3) in tier and (1, 1) not in tier


def test_a_failure_on_the_prefetch_thread_is_raised_to_the_decoder_not_waited_for():
    stats = RuntimeStats()
    prefetcher = Prefetcher(Transfer(HostExperts({0: [[torch.zeros(4)]]})), FastTier(10**6, stats), stats)
    prefetcher.plan(lambda: {}["no such key"])
    prefetcher.thread.join(5)
    assert not prefetcher.thread.is_alive()
    with pytest.raises(RuntimeError, match="prefetch thread failed: KeyError"):
        prefetcher.request(in_token_requests([(0, 0)], 1, 3))
    prefetcher.close()


def test_reading_time_counts_the_read_under_way_and_stops_when_it_is_done(gated):
    slow, _, _, prefetcher = gated
    assert prefetcher.reading_s() == 0.0
    prefetcher.request(_requests([(1, 0)]))
    assert slow.reading.wait(5)
    time.sleep(0.05)
    under_way = prefetcher.reading_s()
    assert under_way >= 0.05
    slow.gate.set()
    assert prefetcher.wait_for((1, 0))
    done = prefetcher.reading_s()
    time.sleep(0.05)
    assert done >= under_way and prefetcher.reading_s() == done
