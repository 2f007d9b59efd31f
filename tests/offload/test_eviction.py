"""Eviction policies: LRFU's score is the decayed count of uses, it keeps what is used often
lately and forgets what was used often long ago; a prefetch counts as no use; the factory
refuses unknown names and a Belady without its future; a prefetch awaiting its layer is
evicted only when nothing else can be; next-use eviction evicts what a forecast (else the
use rate) puts farthest away; per-layer LRU evicts from the incoming expert's layer."""

import math

import numpy as np
import pytest

from specmoe.offload.eviction import LFU, LRFU, LRFU_HALF_LIFE_TOKENS, NextUse, eviction_policy
from specmoe.offload.forecast import Forecast
from specmoe.offload.policy import Residency


def test_the_lrfu_score_is_the_sum_of_uses_halved_every_half_life():
    rng = np.random.default_rng(0)
    policy = LRFU(half_life=10)
    uses = np.sort(rng.integers(0, 200, 30))
    for position in uses:
        policy.on_use((0, 0), int(position))
    now = 250
    expected = sum(0.5 ** ((now - p) / 10) for p in uses)
    assert 2.0 ** (policy.log_score[(0, 0)] - now / 10) == pytest.approx(expected, rel=1e-9)


def test_lrfu_keeps_recent_frequency_and_forgets_old_frequency():
    old, recent, once = (0, 0), (0, 1), (0, 2)
    for policy in (LRFU(half_life=8), LFU()):
        for position in range(5):
            policy.on_use(old, position)  # often, long ago
        for position in (100, 101, 102):
            policy.on_use(recent, position)  # often, lately
        policy.on_use(once, 103)  # once, last
        victims = {policy.victim([old, recent, once], 104)}
        if isinstance(policy, LRFU):
            assert victims == {old}, "12 half-lives on, five old uses weigh less than one fresh use"
            assert policy.victim([recent, once], 104) == once
        else:
            assert victims == {once}, "LFU never forgets: the contrast LRFU exists for"


def test_an_lrfu_prefetch_is_no_use_and_goes_first_once_demoted():
    policy = LRFU(half_life=8)
    policy.on_use((0, 0), 0)
    policy.on_insert((1, 0), 5)  # prefetched, not used yet
    assert policy.log_score[(1, 0)] == -math.inf
    assert policy.victim([(0, 0), (1, 0)], 6) == (1, 0)
    policy.on_use((1, 0), 7)
    assert policy.victim([(0, 0), (1, 0)], 8) == (0, 0)  # used later, same count
    policy.demote((1, 0))
    assert policy.victim([(0, 0), (1, 0)], 9) == (1, 0)


def test_the_factory_builds_each_policy_and_refuses_what_it_cannot():
    policy = eviction_policy("lrfu", num_layers=6)
    assert isinstance(policy, LRFU) and policy.half_life == LRFU_HALF_LIFE_TOKENS * 6
    assert eviction_policy("belady", 6, future={}).by_position
    with pytest.raises(
        ValueError, match="eviction must be one of lru, lfu, lrfu, belady, next-use, lru-per-layer, got 'fifo'"
    ):
        eviction_policy("fifo", 6)
    with pytest.raises(ValueError, match="Belady eviction needs the future"):
        eviction_policy("belady", 6)
    with pytest.raises(ValueError, match="half-life must be positive"):
        LRFU(0)


@pytest.mark.parametrize("name", ["lru", "lfu", "lrfu"])
def test_a_prefetch_awaiting_its_layer_is_not_evicted_for_the_next_one(name):
    cache = Residency(3, eviction_policy(name, num_layers=4))
    for position, expert in enumerate((0, 1, 2)):
        cache.position = position
        cache.admit((0, expert), 0.0, 1, prefetch=False)
        cache.use((0, expert))
    # At count zero a fresh prefetch is a frequency policy's first victim, but it waits for
    # its layer: the used experts go first, then the oldest prefetch.
    for position, expert in enumerate((5, 6, 7, 8), start=3):
        cache.position = position
        cache.admit((1, expert), 0.0, 1, prefetch=True)
    assert sorted(cache.entries) == [(1, 6), (1, 7), (1, 8)]
    cache.finish_layer(1)  # layer 1 ran without them: they go before anything used
    cache.position = 8
    cache.admit((2, 0), 0.0, 1, prefetch=False)
    cache.use((2, 0))
    cache.admit((2, 1), 0.0, 1, prefetch=False)
    assert sorted(cache.entries)[-2:] == [(2, 0), (2, 1)]
    assert cache.wasted_prefetches == 3 and cache.wasted_bytes == 3  # (1, 5) for (1, 8), then two demoted


def test_next_use_evicts_what_the_forecast_puts_farthest_away_and_else_the_rarely_used():
    policy = eviction_policy("next-use", num_layers=4)
    outlook = policy.outlook
    often, once, never = (2, 0), (2, 1), (2, 2)
    for step in range(8):
        outlook.on_use(often, step * 4 + 2)
    outlook.on_use(once, 30)
    for key in (often, once, never):
        policy.on_insert(key, 0)
        policy.on_use(key, 31)
    # position 33 (step 8, layer 1): the next opportunity of layer 2 is position 34
    assert policy.victim([often, once, never], 33) == never  # never used: no rate, no forecast
    assert policy.victim([often, once], 33) == once
    # the newest forecast of position 34 names `once` and leaves `often` below a bound of 0.05
    outlook.observe(Forecast(33, (((2, 1), 34, 0.9),), ((34, 0.05),)))
    assert outlook.chance_next(once, 33) == 0.9 and outlook.chance_next(often, 33) == 0.05
    assert policy.victim([often, once], 33) == often
    # past the forecast position it no longer counts: back to use rates
    assert policy.victim([often, once], 35) == once


def test_next_use_ranks_alike_on_few_and_many_candidates():
    rng = np.random.default_rng(0)
    policy = NextUse()
    policy.outlook = eviction_policy("lru", num_layers=8).outlook
    keys = [(int(layer), int(e)) for layer, e in rng.integers(0, 8, (200, 2))]
    keys = list(dict.fromkeys(keys))
    for position, key in zip(rng.integers(0, 400, 600), rng.choice(len(keys), 600)):
        policy.outlook.on_use(keys[key], int(position))
    for key in keys:
        policy.on_insert(key, 0)
    policy.outlook.observe(Forecast(401, tuple(((k[0], k[1]), 408 + k[0] - 1, 0.5) for k in keys[:20])))
    scalar = min(keys, key=lambda k: policy.order(k, 401))
    assert policy.victim(keys, 401) == scalar  # the vectorised path (>= 32 candidates)
    assert policy.ranking(keys, 401, 5)[0] == scalar


def test_per_layer_lru_evicts_from_the_incoming_layer_while_it_has_one():
    cache = Residency(4, eviction_policy("lru-per-layer", num_layers=2))
    for expert, layer in ((0, 0), (1, 1), (2, 0), (3, 1)):
        cache.admit((layer, expert), 0.0, 1, prefetch=False)
        cache.use((layer, expert))
    cache.admit((1, 9), 0.0, 1, prefetch=False)  # layer 1's least recent goes, though (0, 0) is older
    assert (1, 1) not in cache and (0, 0) in cache
    cache.pinned = {(1, 3), (1, 9)}
    cache.admit((1, 8), 0.0, 1, prefetch=False)  # layer 1 has nothing to give: the oldest of all goes
    assert (0, 0) not in cache
