"""The offload runtime computes exactly what the resident model computes, for every
fast-tier size down to one expert, with or without (even wrong) prefetching."""

import pytest
import torch

from specmoe.errors import InputError
from specmoe.models.loading import wrap_model
from specmoe.offload.live.runtime import OffloadRuntime
from specmoe.offload.policy import PrefetchSettings
from specmoe.offload.settings import NextTokenSettings
from specmoe.predictors.base import ExpertPredictor
from tests.tiny_models import VOCAB, tiny_model

# One family per expert layout (stacked, row-flattened, per-expert modules) and router quirk.
FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "dbrx", "switch_transformers"]


class RandomPredictor(ExpertPredictor):
    """Confidently wrong on purpose: prefetches random experts."""

    name = "random-test"

    def predict_proba(self, context):
        return torch.rand(len(context), self.horizons, context.num_experts)


def _resident(model_type):
    model = tiny_model(model_type)
    model.config._experts_implementation = "eager"
    return model


def _logits(loaded, prompt):
    return loaded.adapter.forward(loaded.model, prompt, torch.ones_like(prompt)).logits


def _expert_bytes(model_type):
    loaded = wrap_model(model_type, tiny_model(model_type))
    return sum(p.numel() * p.element_size() for p in loaded.adapter.expert_parameters(loaded.layers[0], 0))


TIERS = [
    pytest.param("disk", "cpu", id="disk-cpu"),
    pytest.param("host", "cpu", id="host-cpu"),
    pytest.param("host", "cuda", id="host-cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("slow_tier,device", TIERS)
@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("slots", [1, 5, 64])
def test_generation_matches_resident_model(model_type, slots, slow_tier, device, tmp_path):
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    resident = wrap_model(model_type, _resident(model_type).to(device))
    with torch.no_grad():
        expected_logits = _logits(resident, prompt.to(device))
        resident = resident.model
        expected = resident.generate(prompt.to(device), max_new_tokens=6, do_sample=False)
    budget = slots * _expert_bytes(model_type)
    predictor = RandomPredictor(horizons=2) if slots == 5 else None
    runtime = OffloadRuntime(
        wrap_model(model_type, tiny_model(model_type)),
        budget,
        device=device,
        slow_tier=slow_tier,
        experts_dir=tmp_path / "experts",
        predictor=predictor,
        prefetch=PrefetchSettings(layers_ahead=2),
    )
    model = runtime.loaded.model
    try:
        with torch.no_grad():
            actual_logits = _logits(runtime.loaded, prompt.to(device))
            torch.testing.assert_close(actual_logits, expected_logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(prompt.to(device), max_new_tokens=6, do_sample=False), expected)
    finally:
        runtime.close()
    assert 0 < runtime.stats.peak_bytes <= budget
    assert runtime.stats.misses > 0
    if predictor is not None:
        assert runtime.stats.prefetch_requests > 0


@pytest.mark.parametrize("slow_tier,device", TIERS)
@pytest.mark.parametrize("model_type", ["mixtral", "switch_transformers"])
def test_oracle_from_a_recorded_run_prefetches_exactly_what_is_needed(model_type, slow_tier, device, tmp_path):
    """Routing logged by one run of a prompt, replayed as the oracle of a second run with
    Belady eviction: same output; with room for every expert, each expert is read exactly
    once (by the prefetcher, or on demand when the prefetcher had not started on it yet), and
    in a decoder-only model every expert but those of the very first layer is requested
    ahead of its first use: the oracle reads into the next token."""
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1)).to(device)
    runs = {}
    for name in ("record", "oracle"):
        oracle = runs["record"][1] if name == "oracle" else None
        runtime = OffloadRuntime(
            wrap_model(model_type, tiny_model(model_type)),
            10**9,
            device=device,
            slow_tier=slow_tier,
            experts_dir=tmp_path / name,
            oracle=oracle,
            prefetch=PrefetchSettings(eviction="belady" if oracle else "lru"),
        )
        try:
            with torch.no_grad():
                out = runtime.loaded.model.generate(prompt, max_new_tokens=5, do_sample=False)
        finally:
            runtime.close()
        runs[name] = (out, runtime.routing_log, runtime.results())
    (recorded, log, _), (replayed, log_again, stats) = runs["record"], runs["oracle"]
    assert torch.equal(recorded, replayed) and log == log_again
    needed = {(layer, e) for step in log for layer, experts in enumerate(step) for e in experts}
    assert stats["prefetch_reads"] + stats["demand_reads"] == len(needed)
    assert stats["wasted_prefetches"] == 0
    if model_type == "mixtral":
        assert stats["prefetch_requests"] == len(needed - {(0, e) for e in log[0][0]})
    else:  # the encoder runs once; the decoder's first step is out of the encoder's reach
        firsts = {0, runtime.loaded.stacks["encoder"]}
        assert stats["prefetch_requests"] >= len({key for key in needed if key[0] not in firsts})


def test_resident_expert_weights_are_freed(tmp_path):
    loaded = wrap_model("olmoe", tiny_model("olmoe"))
    before = sum(p.numel() for p in loaded.model.parameters())
    runtime = OffloadRuntime(loaded, 10 * _expert_bytes("olmoe"), experts_dir=tmp_path / "e")
    after = sum(p.numel() for p in loaded.model.parameters())
    runtime.close()
    # 2 MoE layers x 8 experts x (gate_up 2F x D + down D x F), F = 16, D = 32
    assert before - after == 2 * 8 * (2 * 16 * 32 + 32 * 16)


def test_budget_below_one_expert_and_unsupported_family_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="needs experts_dir"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10**6)
    with pytest.raises(InputError, match="Belady eviction needs the future"):
        belady = PrefetchSettings(eviction="belady")
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10**6, experts_dir=tmp_path, prefetch=belady)
    with pytest.raises(InputError, match="smaller than one expert"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10, experts_dir=tmp_path / "a")
    with pytest.raises(InputError, match="cannot run jetmoe experts: its experts are split"):
        OffloadRuntime(wrap_model("jet", tiny_model("jetmoe")), 10**6, experts_dir=tmp_path)
    with pytest.raises(InputError, match="predictor_stack must be one of"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10**6, experts_dir=tmp_path, predictor_stack="encoder")
    with pytest.raises(InputError, match="an encoder-decoder's two stacks"):
        switch = wrap_model("switch_transformers", tiny_model("switch_transformers"))
        OffloadRuntime(switch, 10**6, experts_dir=tmp_path, policy="cost-aware+recurrence", predictor=RandomPredictor())


def test_predictor_for_another_model_is_refused(tmp_path):
    predictor = RandomPredictor(horizons=1)
    predictor.fitted_meta = lambda: {"num_layers": 6, "num_experts": 128}
    with pytest.raises(InputError, match="fitted for 6 MoE layers x 128 experts"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10**6, experts_dir=tmp_path, predictor=predictor)


class FailingPredictor(ExpertPredictor):
    name = "failing-test"

    def predict_proba(self, context):
        raise ValueError("this predictor cannot predict")


def test_a_predictor_failing_on_the_prefetch_thread_fails_decoding_instead_of_hanging_it(tmp_path):
    runtime = OffloadRuntime(
        wrap_model("mixtral", tiny_model("mixtral")),
        10**9,
        experts_dir=tmp_path / "experts",
        predictor=FailingPredictor(horizons=2),
        prefetch=PrefetchSettings(layers_ahead=2),
    )
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="prefetch thread failed: ValueError"):
            runtime.loaded.model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        runtime.close()


def test_next_token_prefetch_keeps_the_output_and_its_last_layer_guesses_are_the_choices_made(tmp_path):
    from specmoe.predictors.data import TraceDataset
    from specmoe.predictors.registry import make_predictor
    from tests.predictors.synthetic import make_synthetic_store

    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _resident("olmoe").generate(prompt, max_new_tokens=6, do_sample=False)
    store = make_synthetic_store(tmp_path / "s", num_layers=2, num_experts=8, top_k=2)
    table = make_predictor("token").fit(TraceDataset(store, "all"))
    runtime = OffloadRuntime(
        wrap_model("olmoe", tiny_model("olmoe")),
        3 * _expert_bytes("olmoe"),
        experts_dir=tmp_path / "experts",
        predictor=table,
        next_token=NextTokenSettings(layer=1),  # the last layer: its lens is the model's output, so guesses are exact
    )
    try:
        with torch.no_grad():
            out = runtime.loaded.model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        runtime.close()
    assert torch.equal(out, expected)
    new = out[0, prompt.shape[1] :].tolist()
    assert len(runtime.guess_log) == 6, "one guess per forward pass, made on the decoding thread"
    # step s (0: the prompt's prefill) guesses generated token s
    assert all(guesses == [new[step]] for step, guesses in runtime.guess_log)
    assert runtime.stats.peak_bytes <= 3 * _expert_bytes("olmoe")


def test_next_token_prefetch_needs_a_decoder_only_model_and_a_token_table(tmp_path):
    common = {"experts_dir": tmp_path / "experts", "next_token": NextTokenSettings(layer=0)}
    with pytest.raises(InputError, match="beside a predictor's"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10**9, **common)
    with pytest.raises(InputError, match="needs a token table predictor, got 'random-test'"):
        OffloadRuntime(wrap_model("olmoe", tiny_model("olmoe")), 10**9, predictor=RandomPredictor(), **common)
    switch = wrap_model("switch_transformers", tiny_model("switch_transformers"))
    with pytest.raises(InputError, match="needs a decoder-only model"):
        OffloadRuntime(switch, 10**9, predictor=RandomPredictor(), **common)


@pytest.mark.parametrize("kind", ["router_input", "residual_out"])
def test_a_hidden_state_predictor_prefetches_from_the_states_of_the_step_so_far(tiny_checkpoints, tmp_path, kind):
    from specmoe.models.loading import load_model
    from specmoe.predictors.lookahead import RouterLookaheadPredictor, extract_routers

    checkpoint = str(tiny_checkpoints["olmoe"])
    predictor = RouterLookaheadPredictor(hidden=kind, horizons=1)
    routers = extract_routers(checkpoint, "decoder")
    predictor.load_state_tensors({**routers, "temperature": torch.ones(1)}, {"num_layers": 2, "num_experts": 8})
    shown = []
    real = predictor.predict_proba
    predictor.predict_proba = lambda context: shown.append((context.layer, context.hidden.shape)) or real(context)
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    resident = load_model(checkpoint)
    with torch.no_grad():
        expected = resident.model.generate(prompt, max_new_tokens=5, do_sample=False)
    runtime = OffloadRuntime(load_model(checkpoint), 10**9, experts_dir=tmp_path / "experts", predictor=predictor)
    try:
        with torch.no_grad():
            out = runtime.loaded.model.generate(prompt, max_new_tokens=5, do_sample=False)
    finally:
        runtime.close()
    assert torch.equal(out, expected)
    # layer 0 plans for layer 1 with layer 0's state of every token of the step (8 prefill, then 1)
    assert shown and all(layer == 0 and shape[1:] == (1, 32) for layer, shape in shown)
    assert {shape[0] for _, shape in shown} <= {8, 1}


@pytest.mark.parametrize("model_type", ["mixtral", "switch_transformers"])
def test_three_tiers_disk_host_cache_fast_tier_keep_the_output_and_their_budgets(model_type, tmp_path):
    """Disk -> host cache -> fast tier, with the host-to-GPU copy stood in for by a clone on
    this CPU-only machine: the output is the resident model's, each tier within its budget."""
    prompt = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _resident(model_type).generate(prompt, max_new_tokens=6, do_sample=False)
    expert = _expert_bytes(model_type)
    runtime = OffloadRuntime(
        wrap_model(model_type, tiny_model(model_type)),
        2 * expert,
        experts_dir=tmp_path / "experts",
        host_cache_bytes=24 * expert,  # room for every expert: each is read from disk once
    )
    try:
        with torch.no_grad():
            out = runtime.loaded.model.generate(prompt, max_new_tokens=6, do_sample=False)
    finally:
        runtime.close()
    stats = runtime.results()
    assert torch.equal(out, expected)
    used = {(layer, e) for step in runtime.routing_log for layer, experts in enumerate(step) for e in experts}
    assert stats["peak_bytes"] <= 2 * expert and stats["host_cache_peak_bytes"] == len(used) * expert
    assert runtime.transfer.slow.misses == len(used)  # each expert read from disk once
    if model_type == "mixtral":  # the fast tier's repeated misses were the host cache's hits
        assert stats["demand_reads"] > len(used) and stats["host_cache_hit_rate"] > 0
    with pytest.raises(InputError, match="a host cache of 10 B is smaller than one expert"):
        OffloadRuntime(
            wrap_model(model_type, tiny_model(model_type)), 2 * expert, experts_dir=tmp_path / "e2", host_cache_bytes=10
        )


def test_the_recurrence_learns_the_prompt_and_every_decoded_token(tmp_path):
    """A prompt of two sequences runs as one step: each sequence's past holds its prompt, and
    after each later step one token more, with the experts every token but the newest used."""
    loaded = wrap_model("olmoe", tiny_model("olmoe"))
    runtime = OffloadRuntime(
        loaded,
        4 * _expert_bytes("olmoe"),
        experts_dir=tmp_path,
        policy="cost-aware+recurrence",
        predictor=RandomPredictor(horizons=1),
        planning="synchronous",
    )
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7], [8, 9, 8, 9, 8, 9]])
    try:
        with torch.no_grad():
            out = loaded.model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False
            )
    finally:
        runtime.close()
    # its reads are weighed in times learnt as it runs, what a read costs the layers too
    assert runtime.results()["link_model"]["compute_cost_learnt"]
    recurrence = runtime.session.tier.residency.outlook.recurrence
    for b in range(2):
        assert recurrence.tokens[b] == out[b, :-1].tolist()  # the prompt, then the tokens decoded
        assert len(recurrence.used[b]) == len(recurrence.tokens[b]) - 1  # the newest has not run yet
        assert all(
            len({layer for layer, _ in recurrence._keys(used)}) == len(loaded.layers) for used in recurrence.used[b]
        )
