"""The simulator against hand-computed timelines and invariants (all figures simulated)."""

import numpy as np
import pytest

from specmoe.errors import InputError
from specmoe.offload.policy import POLICIES, LinkModel, PrefetchSettings
from specmoe.offload.simulated.cost import HardwareProfile
from specmoe.offload.simulated.simulator import NO_TOKEN, SimulationConfig, plan_forecasts, simulate

PROFILE = HardwareProfile("test", bandwidth_bytes_per_s=1000.0, latency_s=0.5, compute_s_per_layer=1.0)
BYTES = 500  # transfer = 0.5 + 0.5 = 1.0 s


def _routing(seq):
    """[[layer experts per step]] for one sequence, k=1 -> (S, 1, L, 1)."""
    return np.array(seq, dtype=np.int64)[:, None, :, None]


def _config(policy, slots, **prefetch):
    return SimulationConfig(policy=policy, capacity_bytes=slots * BYTES, prefetch=PrefetchSettings(**prefetch))


def test_on_demand_timeline_is_transfer_plus_compute_per_miss():
    routing = _routing([[0, 1], [0, 1]])  # 2 steps x 2 layers; capacity 1: every access misses
    result = simulate(routing, PROFILE, BYTES, _config("on-demand", 1)).summary()
    assert result["total_s"] == pytest.approx(4 * (1.0 + 1.0))
    assert result["hits"] == 0 and result["demand_loads"] == 4 and result["stall_s"] == pytest.approx(4.0)
    roomy = simulate(routing, PROFILE, BYTES, _config("lru", 2)).summary()
    assert roomy["hits"] == 2 and roomy["total_s"] == pytest.approx(2 * 2.0 + 2 * 1.0)
    floor = simulate(routing, PROFILE, BYTES, _config("on-demand", 2)).summary()
    assert floor["hits"] == 0  # on-demand keeps nothing between layers


def test_oracle_prefetch_hides_transfers_behind_compute():
    routing = _routing([[0, 1, 2, 3]])
    on_demand = simulate(routing, PROFILE, BYTES, _config("on-demand", 4)).summary()
    oracle = simulate(routing, PROFILE, BYTES, _config("oracle", 4, oracle_reach=1)).summary()
    # layer 0 loads on demand (1 s) then computes (1 s); each later load overlaps the previous compute
    assert on_demand["total_s"] == pytest.approx(8.0)
    assert oracle["total_s"] == pytest.approx(5.0) and oracle["stall_s"] == pytest.approx(1.0)


def test_the_oracle_reads_into_the_next_token_but_not_a_whole_token_ahead():
    routing = _routing([[0, 1], [2, 3], [4, 5]])  # every access is new: 3 steps x 2 layers
    across = simulate(routing, PROFILE, BYTES, _config("oracle", 6)).summary()
    # only the first token's first layer loads on demand; every later read overlaps a layer's compute
    assert across["demand_loads"] == 1 and across["stall_s"] == pytest.approx(1.0)
    assert across["total_s"] == pytest.approx(1.0 + 6 * 1.0)
    with pytest.raises(InputError, match=r"--oracle-reach must be in \[1, 1\] for 2 MoE layers, got 2"):
        simulate(routing, PROFILE, BYTES, _config("oracle", 6, oracle_reach=2))


PREFETCH = POLICIES["prefetch"]


def test_perfect_predictions_waste_nothing_and_wrong_ones_are_wasted():
    rng = np.random.default_rng(0)
    routing = rng.integers(0, 8, (30, 1, 4, 1))
    steps, _, layers, _ = routing.shape
    right = np.zeros((steps, 1, layers, 1, 8), dtype=np.float32)  # (S, B, L, H, E)
    for layer in range(layers - 1):
        right[np.arange(steps), 0, layer, 0, routing[:, 0, layer + 1, 0]] = 1.0
    settings = PrefetchSettings(experts_per_layer=1).resolve(top_k=1, num_layers=layers)
    cfg = _config("prefetch", 6, experts_per_layer=1)
    lru = simulate(routing, PROFILE, BYTES, _config("lru", 6)).summary()
    perfect = simulate(routing, PROFILE, BYTES, cfg, plan_forecasts(right, settings, PREFETCH)).summary()
    oracle = simulate(routing, PROFILE, BYTES, _config("oracle-prefetch", 6, oracle_reach=1)).summary()
    assert perfect["wasted_prefetches"] == 0 and perfect["total_s"] < lru["total_s"]
    assert oracle["total_s"] <= perfect["total_s"]  # the oracle also reaches the next token's first layer
    wrong = plan_forecasts(np.roll(right, 4, axis=-1), settings, PREFETCH)
    wasted = simulate(routing, PROFILE, BYTES, cfg, wrong).summary()
    assert wasted["wasted_prefetches"] > 0 and wasted["total_s"] > perfect["total_s"]
    strict = PrefetchSettings(experts_per_layer=1, min_probability=1.0).resolve(top_k=1, num_layers=layers)
    floored = plan_forecasts(right * 0.5, strict, PREFETCH)  # nothing clears the floor
    assert all(listed == () for step in floored for rows in step for _, listed, _ in rows)


def test_plans_pool_a_batch_by_expected_uses():
    probs = np.zeros((1, 2, 2, 1, 4), dtype=np.float32)  # 1 step, 2 sequences, 2 layers, 1 horizon
    probs[0, :, 0, 0] = [[0.55, 0.45, 0, 0], [0, 0.45, 0, 0.55]]
    settings = PrefetchSettings(experts_per_layer=1).resolve(top_k=1, num_layers=2)
    # expert 1 is neither sequence's first choice, but the batch's most expected use (0.9)
    [(layer, listed, bound)] = plan_forecasts(probs, settings, PREFETCH)[0][0]
    assert (layer, [e for e, _ in listed]) == (1, [1])
    # its probability: the chance either sequence needs it; the bound, the likeliest left out
    assert listed[0][1] == pytest.approx(1 - 0.55 * 0.55) and bound == pytest.approx(0.55)


@pytest.mark.parametrize("eviction", ["lru", "lfu", "lrfu", "belady"])
@pytest.mark.parametrize("policy", ["on-demand", "cache", "oracle-prefetch"])
def test_fast_tier_never_exceeds_capacity(eviction, policy):
    rng = np.random.default_rng(1)
    routing = rng.integers(0, 16, (40, 3, 4, 2))
    routing[35:, 2] = NO_TOKEN  # one sequence ends early
    for slots in (1, 3, 8):
        name = eviction if policy == "cache" else policy
        config = _config(name, slots, layers_ahead=2, eviction=eviction)
        result = simulate(routing, PROFILE, BYTES, config).summary()
        assert result["peak_bytes"] <= slots * BYTES
        assert result["tokens"] == 40 * 3 - 5


def test_belady_hits_at_least_as_often_as_lru_lfu_and_lrfu():
    rng = np.random.default_rng(2)
    routing = rng.zipf(1.5, (200, 1, 3, 1)) % 12
    hits = {e: simulate(routing, PROFILE, BYTES, _config(e, 5)).hits for e in ("lru", "lfu", "lrfu", "belady")}
    assert hits["belady"] >= max(hits["lru"], hits["lfu"], hits["lrfu"])


def test_a_repeating_sequence_is_forecast_from_its_own_past():
    """Three tokens in a loop, each routed alike every time: the recurrence learns the loop and
    keeps what the next tokens need; without token ids the policy is refused."""
    experts = {1: [0, 1], 2: [2, 3], 3: [1, 0], 4: [3, 2]}
    tokens = np.array([1, 2, 3, 4] * 12)
    routing = _routing([experts[t] for t in tokens])
    steps, layers, width = len(tokens), 2, 4
    probs = np.full((steps, 1, layers, 1, width), 0.25, np.float32)  # a predictor that knows nothing
    link = LinkModel(read_s=1.0, layer_s=1.0)
    stalls, stats = {}, {}
    for policy in ("cost-aware+next-use", "cost-aware+recurrence"):
        rule = POLICIES[policy]
        plans = plan_forecasts(probs, rule.resolve(PrefetchSettings(), top_k=1, num_layers=layers), rule)
        config = SimulationConfig(policy=policy, capacity_bytes=5 * BYTES, link=link)
        result = simulate(
            routing, PROFILE, BYTES, config, plans, token_ids=tokens[:, None], sequences=np.zeros((steps, 1))
        )
        stalls[policy], stats[policy] = result.stall_s, result.recurrence
    assert stats["cost-aware+next-use"] is None
    assert stats["cost-aware+recurrence"]["recurrence_precision"] == 1.0
    assert stats["cost-aware+recurrence"]["recurrence_matched"] > 0.9
    assert stalls["cost-aware+recurrence"] < stalls["cost-aware+next-use"]
    with pytest.raises(ValueError, match="pass token_ids and sequences"):
        simulate(routing, PROFILE, BYTES, config, plans)
