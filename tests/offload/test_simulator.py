"""The simulator against hand-computed timelines and invariants (all figures simulated)."""

import numpy as np
import pytest

from specmoe.offload.cost import HardwareProfile
from specmoe.offload.simulator import NO_TOKEN, SimulationConfig, simulate

PROFILE = HardwareProfile("test", bandwidth_bytes_per_s=1000.0, latency_s=0.5, compute_s_per_layer=1.0)
BYTES = 500  # transfer = 0.5 + 0.5 = 1.0 s


def _routing(seq):
    """[[layer experts per step]] for one sequence, k=1 -> (S, 1, L, 1)."""
    return np.array(seq, dtype=np.int64)[:, None, :, None]


def test_on_demand_timeline_is_transfer_plus_compute_per_miss():
    routing = _routing([[0, 1], [0, 1]])  # 2 steps x 2 layers; capacity 1: every access misses
    result = simulate(routing, PROFILE, BYTES, SimulationConfig(capacity=1)).summary()
    assert result["total_s"] == pytest.approx(4 * (1.0 + 1.0))
    assert result["hits"] == 0 and result["demand_loads"] == 4 and result["stall_s"] == pytest.approx(4.0)
    roomy = simulate(routing, PROFILE, BYTES, SimulationConfig(policy="cache", capacity=2)).summary()
    assert roomy["hits"] == 2 and roomy["total_s"] == pytest.approx(2 * 2.0 + 2 * 1.0)
    floor = simulate(routing, PROFILE, BYTES, SimulationConfig(capacity=2)).summary()
    assert floor["hits"] == 0  # on-demand keeps nothing between layers


def test_oracle_prefetch_hides_transfers_behind_compute():
    routing = _routing([[0, 1, 2, 3]])
    on_demand = simulate(routing, PROFILE, BYTES, SimulationConfig(capacity=4)).summary()
    oracle = simulate(routing, PROFILE, BYTES, SimulationConfig(policy="oracle", capacity=4, lookahead=1)).summary()
    # layer 0 loads on demand (1 s) then computes (1 s); each later load overlaps the previous compute
    assert on_demand["total_s"] == pytest.approx(8.0)
    assert oracle["total_s"] == pytest.approx(5.0) and oracle["stall_s"] == pytest.approx(1.0)


def test_an_oracle_reaching_into_the_next_token_prefetches_its_first_layer():
    routing = _routing([[0, 1], [2, 3], [4, 5]])  # every access is new: 3 steps x 2 layers
    within = simulate(routing, PROFILE, BYTES, SimulationConfig(policy="oracle", capacity=6)).summary()
    across = simulate(routing, PROFILE, BYTES, SimulationConfig(policy="oracle", capacity=6, oracle_lookahead=1))
    across = across.summary()
    # within the token, each step's layer 0 loads on demand (3 x 1 s); across, only the first does
    assert within["demand_loads"] == 3 and within["stall_s"] == pytest.approx(3.0)
    assert across["demand_loads"] == 1 and across["stall_s"] == pytest.approx(1.0)
    assert across["total_s"] == pytest.approx(1.0 + 6 * 1.0)
    with pytest.raises(ValueError, match=r"oracle_lookahead must be in \[1, 1\] for 2 MoE layers, got 2"):
        simulate(routing, PROFILE, BYTES, SimulationConfig(policy="oracle", capacity=6, oracle_lookahead=2))


def test_perfect_predictions_match_the_oracle_and_wrong_ones_are_wasted():
    rng = np.random.default_rng(0)
    routing = rng.integers(0, 8, (30, 1, 4, 1))
    steps, _, layers, _ = routing.shape
    right = np.zeros((steps, 1, layers, 1, 1), dtype=np.int64)
    for layer in range(layers - 1):
        right[:, :, layer, 0, 0] = routing[:, :, layer + 1, 0]
    probs = np.ones_like(right, dtype=np.float32)
    cfg = SimulationConfig(policy="prefetch", capacity=6, lookahead=1, budget=1)
    oracle = simulate(routing, PROFILE, BYTES, SimulationConfig(policy="oracle", capacity=6, lookahead=1)).summary()
    perfect = simulate(routing, PROFILE, BYTES, cfg, (right, probs)).summary()
    assert perfect["total_s"] == pytest.approx(oracle["total_s"])
    wrong = simulate(routing, PROFILE, BYTES, cfg, ((right + 4) % 8, probs)).summary()
    assert wrong["wasted_prefetches"] > 0 and wrong["total_s"] > perfect["total_s"]
    ignored = simulate(
        routing, PROFILE, BYTES, SimulationConfig(policy="prefetch", capacity=6, threshold=2.0), (right, probs)
    ).summary()
    assert ignored["prefetch_loads"] == 0  # nothing clears the threshold


@pytest.mark.parametrize("eviction", ["lru", "lfu", "lrfu", "belady"])
@pytest.mark.parametrize("policy", ["on-demand", "cache", "oracle"])
def test_fast_tier_never_exceeds_capacity(eviction, policy):
    rng = np.random.default_rng(1)
    routing = rng.integers(0, 16, (40, 3, 4, 2))
    routing[35:, 2] = NO_TOKEN  # one sequence ends early
    for capacity in (1, 3, 8):
        result = simulate(
            routing, PROFILE, BYTES, SimulationConfig(policy=policy, eviction=eviction, capacity=capacity, lookahead=2)
        ).summary()
        assert result["peak_slots"] <= capacity
        assert result["tokens"] == 40 * 3 - 5


def test_belady_hits_at_least_as_often_as_lru_lfu_and_lrfu():
    rng = np.random.default_rng(2)
    routing = rng.zipf(1.5, (200, 1, 3, 1)) % 12
    hits = {
        e: simulate(routing, PROFILE, BYTES, SimulationConfig(policy="cache", eviction=e, capacity=5)).hits
        for e in ("lru", "lfu", "lrfu", "belady")
    }
    assert hits["belady"] >= max(hits["lru"], hits["lfu"], hits["lrfu"])
