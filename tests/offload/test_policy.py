"""The policy core, and proof that the engines run one model of it: the simulator (under an
instant link) and the measured replay (reading synchronously) make the same decisions on the
same routing, predictions and sizes, and so do the replay and the model runtime."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from specmoe.bench.replay import random_experts, replay
from specmoe.errors import InputError
from specmoe.offload.policy import (
    POLICIES,
    LinkModel,
    PrefetchQueue,
    PrefetchSettings,
    choose_prefetches,
    lru_gap_closed,
    oracle_requests,
    predictors_for,
    prefetch_horizons,
)
from specmoe.offload.simulated.cost import HardwareProfile
from specmoe.offload.simulated.simulator import SimulationConfig, plan_forecasts, simulate
from specmoe.predictors.data import Context
from specmoe.predictors.registry import make_predictor

LAYERS, EXPERTS, TOP_K, TOKENS = 4, 8, 2, 24
INSTANT = HardwareProfile("instant", bandwidth_bytes_per_s=1e30, latency_s=0.0, compute_s_per_layer=1.0)


def test_the_lru_gap_is_measured_from_lru_to_the_oracle_in_stall():
    rows = [{"policy": p, "stall": s} for p, s in [("lru", 10.0), ("lfu", 12.0), ("cost-aware", 4.0), ("oracle", 2.0)]]
    lru_gap_closed(rows, lambda r: r["stall"])
    assert [r["lru_gap_closed"] for r in rows] == [0.0, -0.25, 0.75, 1.0]
    without_lru = [{"policy": p, "stall": 1.0} for p in ("lfu", "oracle")]
    lru_gap_closed(without_lru, lambda r: r["stall"])
    assert [r["lru_gap_closed"] for r in without_lru] == [None, None]
    nothing_to_close = [{"policy": p, "stall": 1.0} for p in ("lru", "lfu", "oracle")]
    lru_gap_closed(nothing_to_close, lambda r: r["stall"])
    assert {r["lru_gap_closed"] for r in nothing_to_close} == {None}


def test_choose_prefetches_takes_the_most_expected_per_layer_pooled_over_the_batch():
    probs = torch.zeros(2, 3, 6)
    probs[0, 0, [1, 2]] = torch.tensor([0.6, 0.4])
    probs[1, 0, [2, 3]] = torch.tensor([0.5, 0.5])  # pooled: expert 2 (0.9), then 1 (0.6)
    probs[:, 1, 4] = 1.0
    probs[:, 1, 5] = 0.5
    assert choose_prefetches(probs, range(3, 5), per_layer=2) == [(3, 2), (3, 1), (4, 4), (4, 5)]
    # a floor drops what no token believes in, whatever the pooled rank
    assert choose_prefetches(probs, range(3, 5), per_layer=2, min_probability=0.55) == [(3, 1), (4, 4)]
    assert choose_prefetches(probs[:1], range(3, 4), per_layer=1) == [(3, 1)]
    # ties go to the lower expert id, whatever dtype the predictor answers in
    ties = torch.full((1, 1, 4), 0.25, dtype=torch.bfloat16)
    assert choose_prefetches(ties, range(2, 3), per_layer=2) == [(2, 0), (2, 1)]


def test_the_oracle_reads_ahead_in_decode_order_into_the_next_token():
    routing = np.array([[[1, 2], [3, -1]], [[4, 4], [5, 6]]])  # 2 steps x 2 layers x k=2; -1: dropped

    def experts_at(p):
        return routing[p // 2, p % 2]

    assert oracle_requests(experts_at, 1, 1, 4, 2) == [((0, 4), 2)]  # step 0's last layer -> step 1's first
    assert oracle_requests(experts_at, 0, 3, 4, 2) == [((1, 3), 1), ((0, 4), 2), ((1, 5), 3), ((1, 6), 3)]
    assert oracle_requests(experts_at, 3, 1, 4, 2) == []  # nothing after the end


def test_a_request_is_stale_once_decoding_reaches_its_position_without_needing_it():
    log = []
    queue = PrefetchQueue(log)
    present = {(2, 9)}.__contains__
    queued = queue.request([((1, 0), 1), ((1, 1), 1), ((2, 0), 2), ((2, 9), 2), ((0, 0), 0)], present, position=0)
    assert queued == [((1, 0), 1), ((1, 1), 1), ((2, 0), 2)]  # present, and late (position 0 reached), left out
    assert queue.request([((1, 0), 5)], present, 0) == []  # queued already
    assert queue.begin_layer(1, needed={(1, 1)}) == [((1, 0), 1)]
    assert queue.take((1, 1)) and not queue.take((1, 1))  # the decoder reads it itself
    assert queue.finish_layer(2) == [((2, 0), 2)] and len(queue) == 0
    assert [entry[0] for entry in log] == ["request"] * 3 + ["drop", "drop"]


def test_prefetch_settings_resolve_their_defaults_once_and_refuse_a_whole_token_of_reach():
    resolved = PrefetchSettings().resolve(top_k=8, num_layers=16)
    assert (resolved.experts_per_layer, resolved.oracle_reach) == (16, 15)
    assert PrefetchSettings().resolve(top_k=1, num_layers=1).oracle_reach == 0  # one MoE layer: nothing ahead
    with pytest.raises(InputError, match=r"--oracle-reach must be in \[1, 15\] for 16 MoE layers, got 16"):
        PrefetchSettings(oracle_reach=16).resolve(top_k=8, num_layers=16)


def test_presets_fix_their_settings_and_a_stride_prefetcher_reads_only_its_farthest_layer():
    settings = PrefetchSettings(layers_ahead=3, experts_per_layer=5)
    mixtral = POLICIES["mixtral-offloading"].resolve(settings, top_k=2, num_layers=8)
    assert (mixtral.layers_ahead, mixtral.experts_per_layer) == (1, 2)
    assert POLICIES["mixtral-offloading"].eviction_for(mixtral) == "lru-per-layer"
    assert POLICIES["fate"].resolve(settings, top_k=2, num_layers=8).experts_per_layer == 4
    assert POLICIES["cost-aware"].resolve(settings, top_k=2, num_layers=8).layers_ahead == 7
    promoe = POLICIES["promoe"].resolve(settings, top_k=2, num_layers=8)
    assert prefetch_horizons(3, 8, promoe, POLICIES["promoe"], predicted=4) == [2]
    assert prefetch_horizons(6, 8, promoe, POLICIES["promoe"], predicted=4) == []  # l+2 is past the stack
    assert prefetch_horizons(3, 8, settings, POLICIES["prefetch"], predicted=2) == [1, 2]  # as far as it predicts
    # a preset runs with the predictor it was built around where one is given, else with each
    assert predictors_for(POLICIES["mixtral-offloading"], ["token", "lookahead", "lookahead"]) == [1, 2]
    assert predictors_for(POLICIES["mixtral-offloading"], ["token", "ngram"]) == [0, 1]
    assert predictors_for(POLICIES["cost-aware"], ["token", "lookahead"]) == [0, 1]


# --- one model under two clocks ----------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Routing of one sequence (T, L, k) from a synthetic store's test split, and predictors
    fitted on its train split, by name: one whose plans depend on the routing so far (a
    transition table) and one that reads earlier tokens (activation history); with the
    transition table's calibration, fitted on the validation split."""
    from specmoe.predictors.calibration import fit_calibration
    from specmoe.predictors.data import TraceDataset
    from tests.predictors.synthetic import make_synthetic_store

    store = make_synthetic_store(
        tmp_path_factory.mktemp("parity"), num_layers=LAYERS, num_experts=EXPERTS, top_k=TOP_K, noise=0.3
    )
    train = TraceDataset(store, "train")
    transition = make_predictor("transition", horizons=2).fit(train)
    history = make_predictor("history", horizons=3, window=6).fit(train)
    calibration = fit_calibration(transition, TraceDataset(store, "val"))
    routing = next(TraceDataset(store, "test").iter_batches(TOKENS)).expert_ids.numpy()[:TOKENS]
    predictors = {"transition": transition, "history": history}
    probabilities = {name: _probabilities(p, routing) for name, p in predictors.items()}
    return routing, predictors, probabilities, calibration


def _probabilities(predictor, routing):
    """(T, 1, L, H, E): what the predictor says once each layer of each token has routed,
    given the tokens before it as the replay gives them."""
    tokens, horizons, earlier = routing.shape[0], predictor.horizons, predictor.previous_tokens
    probs = np.zeros((tokens, 1, LAYERS, horizons, EXPERTS), dtype=np.float32)
    weights = torch.full(routing.shape, 0.5)
    for t in range(tokens):
        previous = np.full((1, earlier, LAYERS, TOP_K), -2)
        for back in range(1, min(earlier, t) + 1):
            previous[0, back - 1] = routing[t - back]
        for layer in range(LAYERS):
            context = Context.from_routing(
                layer,
                torch.from_numpy(routing[t : t + 1, : layer + 1]),
                weights[t : t + 1, : layer + 1],
                torch.zeros(1, dtype=torch.long),
                LAYERS,
                EXPERTS,
                previous=torch.from_numpy(previous),
            )
            probs[t, 0, layer] = predictor.predict_proba(context)[0].numpy()
    return probs


CASES = [
    ("on-demand", {}),
    ("lru", {}),
    ("lfu", {}),
    ("lrfu", {}),
    ("belady", {}),
    ("next-use", {}),
    ("prefetch", {"layers_ahead": 2, "experts_per_layer": 3}),
    ("prefetch", {"eviction": "lfu", "min_probability": 0.2}),
    ("prefetch", {"eviction": "next-use"}),
    ("cost-aware", {}),
    ("cost-aware", {"eviction": "lfu"}),
    ("cost-aware+next-use", {}),
    ("cost-aware+recurrence", {}),
    ("oracle-prefetch", {"eviction": "lrfu", "oracle_reach": 2}),
    ("oracle", {}),
    ("mixtral-offloading", {}),
    ("moe-infinity", {}),
    ("fate", {}),
    ("promoe", {}),
]
LINK = LinkModel(read_s=1.0, layer_s=0.4)
"""Value-weighed policies price reads by time; both engines are given these, not a clock."""


@pytest.mark.parametrize("slots", [1, 2, 5, 12])  # 1: a layer wider than the tier streams through it
@pytest.mark.parametrize(("policy", "prefetch"), CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
def test_the_simulator_and_the_measured_replay_make_the_same_decisions(recorded, tmp_path, policy, prefetch, slots):
    routing, predictors, probabilities, calibration = recorded
    rule, settings = POLICIES[policy], PrefetchSettings(**prefetch)
    predictor = predictors["history" if rule.predictor == "history" else "transition"]
    slow = random_experts("host", LAYERS, EXPERTS, 16, 8, directory=None)
    expert_bytes = slow.expert_nbytes(0)
    measured, simulated = [], []
    tokens = np.arange(TOKENS) % 5  # a sequence that repeats, for the policy that matches its past
    replay(
        slow,
        routing,
        np.full(routing.shape, 0.5, np.float32),
        tokens,
        policy=policy,
        budget_bytes=slots * expert_bytes,
        num_experts=EXPERTS,
        prefetch=settings,
        predictor=predictor if rule.prefetch == "predictor" else None,
        calibration=calibration if predictor.name == "transition" else None,
        link=LINK,
        planning="synchronous",
        log=measured,
    )
    plans = None
    if rule.prefetch == "predictor":
        resolved = rule.resolve(settings, top_k=TOP_K, num_layers=LAYERS)
        calibrate = calibration.apply if predictor.name == "transition" else None
        plans = plan_forecasts(probabilities[predictor.name], resolved, rule, calibrate)
    config = SimulationConfig(policy=policy, capacity_bytes=slots * expert_bytes, prefetch=settings, link=LINK)
    result = simulate(
        routing[:, None],
        INSTANT,
        expert_bytes,
        config,
        plans,
        log=simulated,
        token_ids=tokens[:, None],
        sequences=np.zeros((TOKENS, 1), np.int64),
    )
    assert measured == simulated
    kinds = {entry[0] for entry in measured}
    assert "miss" in kinds and ("hit" in kinds or slots < 12 or policy == "on-demand")
    if rule.prefetch != "none" and rule.selection != "none":  # with two slots a layer's own experts fill the tier
        assert "request" in kinds and (result.prefetch_loads > 0 or slots <= 2)
    if slots < 12 and rule.keeps_experts:
        assert "evict" in kinds


def _loop(input_ids, scores):
    """Greedy decoding forced round 3, 4, 5, 3, 4, 5, ..."""
    forced = torch.full_like(scores, -float("inf"))
    forced[:, 3 + input_ids.shape[1] % 3] = 0.0
    return forced


@pytest.mark.parametrize(
    "policy", ["prefetch", "next-use", "cost-aware+next-use", "cost-aware+recurrence", "mixtral-offloading"]
)
def test_the_runtime_and_the_measured_replay_make_the_same_decisions(tmp_path, policy):
    from specmoe.models.loading import wrap_model
    from specmoe.offload.live.runtime import OffloadRuntime
    from tests.tiny_models import VOCAB, tiny_model

    model = wrap_model("mixtral", tiny_model("mixtral"))
    layers, experts, top_k = len(model.layers), model.num_experts, model.top_k
    popularity = make_predictor("popularity", horizons=2)
    popularity.load_state_tensors(
        {"popularity": torch.arange(experts, 0, -1).float().expand(layers, experts).clone()},
        {"num_layers": layers, "num_experts": experts, "top_k": top_k},
    )
    settings = PrefetchSettings(layers_ahead=2, experts_per_layer=2, eviction="lfu")
    expert_bytes = sum(p.numel() * p.element_size() for p in model.adapter.expert_parameters(model.layers[0], 0))
    runtime_log = []
    runtime = OffloadRuntime(
        model,
        6 * expert_bytes,
        slow_tier="host",
        predictor=popularity,
        policy=policy,
        prefetch=settings,
        link=LINK,
        planning="synchronous",
        log=runtime_log,
    )
    prompt = torch.randint(3, VOCAB, (1, 1), generator=torch.Generator().manual_seed(0))  # one token a step
    try:
        with torch.no_grad():  # a text that loops, so that the recurrence has a past to match
            generated = model.model.generate(
                prompt, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([_loop])
            )
    finally:
        runtime.close()
    routing = np.array([[sorted(experts_of)[:top_k] for experts_of in step] for step in runtime.routing_log])
    tokens = generated[0, : len(routing)].numpy()  # what each step decoded
    assert all(len(e) == top_k for step in runtime.routing_log for e in step)  # one token: k experts a layer
    hidden = 16
    slow = random_experts("host", layers, experts, hidden, expert_bytes // (3 * hidden * 2), directory=None)
    assert slow.expert_nbytes(0) == expert_bytes
    replay_log = []
    replay(
        slow,
        routing,
        np.full(routing.shape, 0.5, np.float32),
        tokens,
        policy=policy,
        budget_bytes=6 * expert_bytes,
        num_experts=experts,
        prefetch=settings,
        predictor=popularity,
        link=LINK,
        planning="synchronous",
        log=replay_log,
    )
    assert runtime_log == replay_log
    if POLICIES[policy].recurrence:  # the tiny model's greedy text repeats: forecasts were made
        assert runtime.session.tier.residency.outlook.recurrence.stats()["recurrence_matched"] > 0
        assert runtime.results()["recurrence_matched"] > 0  # reported with the run's counters
    made = {"admit", "evict", "hit", "miss"} | ({"request"} if POLICIES[policy].selection != "none" else set())
    assert made <= {entry[0] for entry in runtime_log}
