"""The measured replay engine: every policy decodes the same tokens within its budget, and
the oracle never reads more than on-demand."""

import numpy as np
import pytest
import torch

from specmoe.bench.replay import interference, random_experts, replay
from specmoe.errors import InputError
from specmoe.offload.policy import PrefetchSettings
from specmoe.offload.simulated.simulator import NO_TOKEN
from specmoe.predictors.registry import make_predictor


@pytest.fixture(scope="module", params=["disk", "host"])
def setup(request, tmp_path_factory):
    rng = np.random.default_rng(0)
    layers, experts, k, tokens = 3, 8, 2, 12
    routing = np.stack([rng.permutation(experts)[:k] for _ in range(tokens * layers)]).reshape(tokens, layers, k)
    weights = np.full(routing.shape, 0.5, dtype=np.float32)
    slow = random_experts(request.param, layers, experts, 32, 16, directory=tmp_path_factory.mktemp("experts"))
    return slow, routing, weights, np.arange(tokens)


@pytest.mark.parametrize(
    ("policy", "planning"),
    [
        ("on-demand", None),
        ("lru", None),
        ("prefetch", "inline"),
        ("prefetch", "background"),
        ("prefetch", "synchronous"),
        ("cost-aware+next-use", "background"),
        ("next-use", "background"),
        ("oracle", None),
    ],
)
def test_policies_stay_within_budget(setup, policy, planning):
    files, routing, weights, tokens = setup
    budget = 4 * files.expert_nbytes(0)
    predictor = None
    if policy != "oracle" and planning:  # popularity over this engine's 3 layers x 8 experts, skewed to expert 0
        predictor = make_predictor("popularity")
        predictor.load_state_tensors(
            {"popularity": torch.arange(8, 0, -1).float().expand(3, 8).clone()},
            {"num_layers": 3, "num_experts": 8, "top_k": 2},
        )
    result = replay(
        files,
        routing,
        weights,
        tokens,
        policy=policy,
        budget_bytes=budget,
        predictor=predictor,
        num_experts=8,
        planning=planning or "background",
    )
    assert result.tokens == 12 and 0 < result.stats["peak_bytes"] <= budget
    assert (result.stats["predict_s"] > 0) == (predictor is not None)
    row = result.row(0.5)
    # CPU time is a part of the wall time; each timed call may skew the two clocks by the
    # cost of reading them, which a run of a few milliseconds does not hide
    calls = routing.shape[0] * routing.shape[1]
    assert 0 <= result.stats["predict_cpu_s"] <= result.stats["predict_s"] + calls * 20e-6
    assert row["predictor_cpu_fraction"] == result.stats["predict_cpu_s"] / result.seconds
    accesses = result.stats["hits"] + result.stats["misses"] + result.stats["late"]
    assert accesses == routing.size
    by_layer = row["stall_ms_per_token_by_layer"]  # where the stall was, summing to all of it
    assert len(by_layer) <= routing.shape[1]
    assert sum(by_layer) == pytest.approx(1e3 * result.stats["stall_s"] / result.tokens, abs=1e-3 * len(by_layer))
    if policy == "on-demand":  # nothing kept between layers, nothing prefetched
        assert (row["demand_reads"], row["late_prefetches"]) == (routing.size, 0)
        assert len(by_layer) == routing.shape[1] and min(by_layer) > 0
    if policy == "prefetch":  # popularity answers by layer alone: asked once per layer, then memoised
        plans = result.stats["plans"]
        assert row["plan_memo_hit_rate"] == (plans - 2) / plans
        # inline, every layer but the last plans; in the background a plan overtaken by a newer one is dropped
        assert plans == 12 * 2 if planning != "background" else 2 <= plans <= 12 * 2


def test_a_batch_decodes_in_lockstep_each_layer_reading_its_tokens_union(setup):
    files, routing, _, tokens = setup
    batch = np.stack([routing, np.roll(routing, 1, axis=0)], 1)  # (T, 2, L, k)
    batch[-3:, 1] = NO_TOKEN  # the second sequence ends three steps early
    budget = 6 * files.expert_nbytes(0)
    log = []
    result = replay(
        files,
        batch,
        np.full(batch.shape, 0.5, np.float32),
        np.stack([tokens, tokens], 1),
        policy="lru",
        budget_bytes=budget,
        num_experts=8,
        log=log,
    )
    assert result.tokens == 2 * 12 - 3 and result.row(0.5)["batch_size"] == 2
    union = sum(
        len({int(e) for e in batch[t, :, layer].reshape(-1) if e >= 0}) for t in range(12) for layer in range(3)
    )
    assert sum(1 for entry in log if entry[0] in ("hit", "miss", "late")) == union
    assert 0 < result.stats["peak_bytes"] <= budget


def test_oracle_reads_no_more_than_on_demand(setup):
    files, routing, weights, tokens = setup
    budget = 6 * files.expert_nbytes(0)
    floor = replay(files, routing, weights, tokens, policy="on-demand", budget_bytes=budget, num_experts=8)
    oracle = replay(files, routing, weights, tokens, policy="oracle", budget_bytes=budget, num_experts=8)
    assert oracle.stats["bytes_read"] <= floor.stats["bytes_read"]
    assert floor.stats["hits"] == 0


def test_belady_reads_no_more_than_lru(setup):
    files, routing, weights, tokens = setup
    budget = 3 * files.expert_nbytes(0)
    lru = replay(files, routing, weights, tokens, policy="lru", budget_bytes=budget, num_experts=8)
    belady = replay(files, routing, weights, tokens, policy="belady", budget_bytes=budget, num_experts=8)
    assert belady.stats["bytes_read"] <= lru.stats["bytes_read"]
    assert belady.stats["peak_bytes"] <= budget


def test_warmup_is_neither_timed_nor_counted(setup):
    """With room for every expert, the measured part misses exactly the experts that warm-up
    never touched."""
    files, routing, weights, tokens = setup
    warmup = 6
    result = replay(files, routing, weights, tokens, policy="lru", budget_bytes=10**9, num_experts=8, warmup=warmup)
    seen = {(layer, int(e)) for t in range(warmup) for layer in range(3) for e in routing[t, layer]}
    later = {(layer, int(e)) for t in range(warmup, 12) for layer in range(3) for e in routing[t, layer]}
    assert result.tokens == 12 - warmup
    assert result.stats["hits"] + result.stats["misses"] == routing[warmup:].size
    assert result.stats["misses"] == len(later - seen)
    with pytest.raises(ValueError, match="warmup must be in"):
        replay(files, routing, weights, tokens, policy="lru", budget_bytes=10**9, num_experts=8, warmup=12)


@pytest.mark.gpu
def test_host_to_gpu_replay_stays_within_budget_and_counts_every_access():
    rng = np.random.default_rng(0)
    routing = np.stack([rng.permutation(8)[:2] for _ in range(36)]).reshape(12, 3, 2)
    slow = random_experts("host", 3, 8, 256, 512, directory=None)
    budget = 4 * slow.expert_nbytes(0)
    result = replay(
        slow,
        routing,
        np.full(routing.shape, 0.5, np.float32),
        np.arange(12),
        policy="oracle",
        budget_bytes=budget,
        num_experts=8,
        device="cuda",
    )
    assert 0 < result.stats["peak_bytes"] <= budget
    assert result.stats["hits"] + result.stats["misses"] + result.stats["late"] == routing.size


def test_oracle_looking_into_the_next_token_reads_only_what_is_used(setup):
    """With room for everything, an oracle reaching into the next token's layers reads each
    used (layer, expert) once and nothing else; it cannot reach a whole token ahead."""
    files, routing, weights, tokens = setup
    used = {(layer, int(e)) for t in range(len(routing)) for layer in range(3) for e in routing[t, layer]}
    budget = 24 * files.expert_nbytes(0)
    reach = PrefetchSettings(oracle_reach=2)
    oracle = replay(
        files, routing, weights, tokens, policy="oracle", budget_bytes=budget, num_experts=8, prefetch=reach
    )
    assert oracle.stats["bytes_read"] == len(used) * files.expert_nbytes(0)
    # every expert is asked for before its first use, the first token's first layer aside
    assert oracle.stats["prefetch_requests"] == len(used - {(0, int(e)) for e in routing[0, 0]})
    with pytest.raises(InputError, match="--oracle-reach"):
        whole_token = PrefetchSettings(oracle_reach=3)
        replay(
            files, routing, weights, tokens, policy="oracle", budget_bytes=budget, num_experts=8, prefetch=whole_token
        )


def test_interference_probe_times_compute_alone_and_beside_a_loader(setup):
    files = setup[0]
    probe = interference(files, num_layers=3, num_experts=8, layers=20)
    assert probe["expert_load_ms"] > 0 and probe["layer_compute_ms"] > 0
    assert probe["layer_compute_ms_while_loading"] > 0 and probe["expert_load_ms_while_computing"] > 0
    # 24 experts: 6 to compute with, 6 timed alone, at most 12 for the loader (its first untimed)
    assert 0 <= probe["loads_while_computing"] <= 3 * 8 - 6 - 6 - 1  # each expert read once: no re-reads
    assert files.read(2, 7)[0].shape == (32, 32)  # the probe leaves the slow tier open


class _HiddenRecorder:
    """A predictor that reads hidden states and records which it was shown."""

    name = "hidden-recorder"
    previous_tokens = 0

    def __init__(self, kind):
        self.needs_hidden, self.seen = kind, []

    def decode_key(self, *args):
        return None

    def predict_proba(self, context):
        self.seen.append((context.layer, context.hidden.clone()))
        return torch.full((len(context), 1, 8), 1 / 8)


@pytest.mark.parametrize("kind", ["router_input", "residual_out"])
def test_a_hidden_state_predictor_sees_the_states_of_its_token_up_to_its_layer(setup, kind):
    files, routing, weights, tokens = setup
    t_count, layers = routing.shape[:2]
    # state (t, l) holds 100 t + l everywhere: what a predictor was shown says where it came from
    states = (100 * torch.arange(t_count)[:, None] + torch.arange(layers)).float()[:, :, None].expand(-1, -1, 4)
    predictor = _HiddenRecorder(kind)
    replay(
        files,
        routing,
        weights,
        tokens,
        policy="prefetch",
        budget_bytes=1 << 30,
        predictor=predictor,
        num_experts=8,
        planning="inline",
        states=states,
    )
    assert len(predictor.seen) == t_count * (layers - 1)  # every layer but the last, whose targets are past the end
    for call, (layer, shown) in enumerate(predictor.seen):
        t = call // (layers - 1)
        assert torch.equal(shown, states[t : t + 1, : layer + 1])
    with pytest.raises(ValueError, match="reads residual_out states: pass states"):
        replay(
            files,
            routing,
            weights,
            tokens,
            policy="prefetch",
            budget_bytes=1 << 30,
            predictor=_HiddenRecorder("residual_out"),
            num_experts=8,
        )
