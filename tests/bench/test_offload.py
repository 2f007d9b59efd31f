"""``specmoe bench offload``: its oracle reads into the next token by default; an oracle
reach the fast tier cannot honour, or a predictor fitted for another model, is refused
before any expert is written, as is an unknown planning mode, policy or prefetch eviction;
a subset of the policies can be run."""

import json

import pytest

from specmoe.bench.offload import benchmark_offload
from specmoe.bench.settings import OffloadBenchSettings
from specmoe.errors import InputError
from specmoe.settings import validated
from tests.predictors.synthetic import save_popularity
from tests.tiny_runs import write_run_corpus


def _settings(prefetch=None, next_token=None, **values) -> OffloadBenchSettings:
    """Tiny experts and no warm-up, unless told otherwise; invalid values fail as on the CLI."""
    values = {"expert_shape": (8, 8), "warmup": 0, **values}
    values |= {"prefetch": prefetch or {}, "next_token": next_token}
    return validated(OffloadBenchSettings, values)


def test_the_oracle_reaches_to_the_layer_before_its_own_in_the_next_token(finished_run):
    out, _ = finished_run
    report = json.loads((out / "offload" / "offload.json").read_text())
    assert report["prefetch"]["oracle_reach"] == report["num_layers"] - 1
    assert {r["policy"] for r in report["rows"]} >= {"on-demand", "oracle"}


def test_an_oracle_reach_of_a_whole_token_is_refused(finished_run, tmp_path):
    out, _ = finished_run
    layers = json.loads((out / "offload" / "offload.json").read_text())["num_layers"]
    with pytest.raises(InputError, match=f"--oracle-reach must be in \\[1, {layers - 1}\\]"):
        benchmark_offload(out / "traces", [], _settings({"oracle_reach": layers}), experts_dir=tmp_path)
    with pytest.raises(InputError, match="--oracle-reach: Input should be greater than or equal to 1"):
        _settings({"oracle_reach": 0})  # 0 is no default


def test_a_predictor_fitted_for_another_model_is_refused(finished_run, tmp_path):
    out, _ = finished_run
    alien = save_popularity(tmp_path / "alien", 7, 5)
    with pytest.raises(InputError, match="fitted for 7 MoE layers x 5 experts; the traces in .* has"):
        benchmark_offload(out / "traces", [alien], _settings(), experts_dir=tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name != "alien"], "experts were written before the check"


def test_unknown_planning_modes_policies_and_evictions_are_refused():
    with pytest.raises(InputError, match="--planning.*'background', 'inline' or 'synchronous'"):
        _settings(planning=("later",))
    with pytest.raises(InputError, match="--policies: must be a non-empty subset of .*got 'lru,fifo'"):
        _settings(policies=("lru", "fifo"))
    with pytest.raises(
        InputError, match="--eviction: Input should be 'lru', 'lfu', 'lrfu', 'belady', 'next-use' or 'lru-per-layer'"
    ):
        _settings({"eviction": "fifo"})


def test_policies_can_be_chosen(finished_run, tmp_path):
    out, _ = finished_run
    settings = _settings(
        {"eviction": "lfu"},
        tokens=4,
        cache_fractions=(0.5,),
        repeats=1,
        policies=("lru", "lrfu", "oracle-prefetch", "oracle"),
    )
    rows = benchmark_offload(out / "traces", [], settings, experts_dir=tmp_path)["rows"]
    assert [(r["policy"], r["eviction"]) for r in rows] == [
        ("lru", "lru"),
        ("lrfu", "lrfu"),
        ("oracle-prefetch", "lfu"),  # the future prefetched, evicted as prefetch runs are
        ("oracle", "belady"),
    ]
    assert rows[0]["speedup_vs_on_demand"] is None and rows[3]["fraction_of_oracle"] == 1.0
    lru_stall, oracle_stall = (min(r["stall_ms_per_token_all_repeats"]) for r in (rows[0], rows[3]))
    expected = (0.0, 1.0) if lru_stall > oracle_stall else (None, None)  # one repeat: its own median
    assert (rows[0]["lru_gap_closed"], rows[3]["lru_gap_closed"]) == expected
    expert = 3 * 8 * 8 * 2
    # it prefetched (how many of its reads the decoder took over first depends on thread timing)
    assert rows[2]["bytes_read"] > rows[2]["demand_reads"] * expert
    assert rows[0]["bytes_read"] == rows[0]["demand_reads"] * expert  # LRU: none
    assert all(len(r["stall_ms_per_token_all_repeats"]) == 1 for r in rows)
    with pytest.raises(InputError, match="--policies prefetch needs at least one --predictor-dir"):
        benchmark_offload(out / "traces", [], _settings(policies=("prefetch",)))


def test_an_interrupted_benchmark_resumes_without_rerunning_finished_runs(finished_run, tmp_path, monkeypatch):
    from specmoe.bench import offload as bench

    out, _ = finished_run
    calls, real_replay = [], bench.replay

    def replay(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(kwargs["policy"])
        return real_replay(*args, **kwargs)

    monkeypatch.setattr(bench, "replay", replay)
    progress = tmp_path / "offload.json.partial.jsonl"
    settings = _settings(tokens=4, cache_fractions=(0.5,), repeats=2, policies=("lru", "oracle"))
    with pytest.raises(KeyboardInterrupt):
        benchmark_offload(out / "traces", [], settings, experts_dir=tmp_path, progress_file=progress)
    assert len(progress.read_text().splitlines()) == 1 + 3  # the settings, then 3 finished runs
    calls.clear()
    monkeypatch.setattr(bench, "replay", lambda *a, **k: (calls.append(k["policy"]), real_replay(*a, **k))[1])
    report = benchmark_offload(out / "traces", [], settings, experts_dir=tmp_path, progress_file=progress)
    assert len(calls) == 1, "finished runs were run again"
    assert [len(r["seconds_all_repeats"]) for r in report["rows"]] == [2, 2]
    assert progress.exists(), "removed before the caller saved the report"


@pytest.fixture(scope="module")
def greedy_traces(tiny_checkpoints, tmp_path_factory):
    """Greedy-decoding traces of the tiny OLMoE model with their residual stream, and a token
    table fitted on them."""
    from specmoe.predictors.data import TraceDataset
    from specmoe.predictors.registry import make_predictor
    from specmoe.traces.collector import CollectConfig, collect

    root = tmp_path_factory.mktemp("greedy")
    store = collect(
        CollectConfig(
            model=str(tiny_checkpoints["olmoe"]),
            texts=[str(write_run_corpus(root / "corpus.jsonl"))],
            out=root / "traces",
            seq_len=32,
            generate=24,
            save_residuals=True,
            progress=False,
        )
    )
    make_predictor("token").fit(TraceDataset(store, "train")).save(root / "token")
    return root


def test_next_token_guesses_from_the_last_layer_are_the_models_own_choices(greedy_traces, tmp_path):
    settings = _settings(
        tokens=8,  # inside one window's 24 decoded tokens: each next token is the model's choice
        cache_fractions=(0.5,),
        repeats=1,
        policies=("prefetch", "prefetch+next-token"),
        next_token={"layer": 1},  # the last layer: its lens is the model's own output
        planning=("background", "inline"),
    )
    report = benchmark_offload(greedy_traces / "traces", [greedy_traces / "token"], settings, experts_dir=tmp_path)
    assert report["traces_mode"] == "greedy" and report["next_token"]["layer"] == 1
    # each prefetch policy once per planning mode, in one pass
    assert report["planning"] == ["background", "inline"] and len(report["rows"]) == 4
    rows = {(r["policy"], r["planning"]): r for r in report["rows"]}
    for mode in ("background", "inline"):
        assert rows["prefetch", mode]["next_token_guess_accuracy"] is None
        assert rows["prefetch+next-token", mode]["next_token_guess_accuracy"] == 1.0


def test_next_token_prefetch_needs_residuals_a_token_table_and_a_layer(greedy_traces, tmp_path):
    from tests.predictors.synthetic import make_synthetic_store

    guessing = _settings(next_token={"layer": 1})
    no_residuals = make_synthetic_store(tmp_path / "synthetic").directory
    with pytest.raises(InputError, match="no residual_out states, .*; collect it with --save-residuals"):
        benchmark_offload(no_residuals, [save_popularity(tmp_path / "p4", 4, 16)], guessing, experts_dir=tmp_path)
    popularity = save_popularity(tmp_path / "popularity", 2, 8)
    with pytest.raises(InputError, match="give a token predictor as a --predictor-dir"):
        benchmark_offload(greedy_traces / "traces", [popularity], guessing, experts_dir=tmp_path)
    with pytest.raises(InputError, match="prefetch\\+next-token needs --next-token-layer"):
        asked = _settings(policies=("prefetch+next-token",))
        benchmark_offload(greedy_traces / "traces", [popularity], asked, experts_dir=tmp_path)
    assert not list(tmp_path.glob("tmp*")), "experts were written before the checks"


def test_two_predictors_of_one_name_are_told_apart_by_their_directory(greedy_traces, tmp_path):
    import shutil

    twin = shutil.copytree(greedy_traces / "token", tmp_path / "twin")
    settings = _settings(tokens=4, cache_fractions=(0.5,), repeats=1, policies=("prefetch",))
    report = benchmark_offload(
        greedy_traces / "traces", [greedy_traces / "token", twin], settings, experts_dir=tmp_path
    )
    assert sorted(r["predictor"] for r in report["rows"]) == ["token:token", "token:twin"]


def test_cost_aware_policies_presets_and_batches_run_side_by_side(greedy_traces, tmp_path):
    import shutil

    token = shutil.copytree(greedy_traces / "token", tmp_path / "token", ignore=shutil.ignore_patterns("calib*"))
    policies = ("lru", "next-use:token", "cost-aware+next-use", "cost-aware+next-token", "mixtral-offloading")
    settings = _settings(
        tokens=6, cache_fractions=(0.5,), repeats=1, batch_sizes=(1, 2), policies=policies, next_token={"layer": 1}
    )
    report = benchmark_offload(greedy_traces / "traces", [token], settings, experts_dir=tmp_path)
    # the token table was calibrated on the validation split, and the calibration kept beside it
    assert (token / "calibration.json").is_file() and report["calibration"]["token"]["split"] == "val"
    assert sorted((r["policy"], r["batch_size"]) for r in report["rows"]) == sorted(
        (p.partition(":")[0], b) for p in policies for b in (1, 2)
    )
    assert report["steps_by_batch_size"] == {"1": 6, "2": 6}
    for row in report["rows"]:
        assert 0 < row["peak_fast_tier_bytes"] <= row["budget_bytes"]
        assert row["tokens"] == 6 * row["batch_size"]  # windows of 24 decoded tokens: no slot ends early
        if row["policy"].startswith("cost-aware"):  # priced with this machine's times, learnt as it ran
            assert row["link_model"]["learnt"] and row["link_model"]["read_ms"] > 0


def test_a_policy_runs_with_the_predictor_named_after_its_colon(greedy_traces, tmp_path):
    import shutil

    twin = shutil.copytree(greedy_traces / "token", tmp_path / "twin")
    settings = _settings(tokens=4, cache_fractions=(0.5,), repeats=1, policies=("prefetch:token:twin",))
    report = benchmark_offload(
        greedy_traces / "traces", [greedy_traces / "token", twin], settings, experts_dir=tmp_path
    )
    assert [r["predictor"] for r in report["rows"]] == ["token:twin"]
    with pytest.raises(InputError, match="--policies prefetch:lookahead: no --predictor-dir holds a predictor"):
        benchmark_offload(greedy_traces / "traces", [twin], _settings(policies=("prefetch:lookahead",)))


def test_the_value_rule_starts_from_the_probe_with_what_a_read_costs_the_layers_beside_it():
    from specmoe.bench.offload import _link

    probe = {"expert_load_ms": 10.0, "expert_load_ms_while_computing": 20.0, "layer_compute_ms": 3.0}
    link = _link(probe | {"layer_compute_ms_while_loading": 6.0})
    assert (link.read_s, link.layer_s, link.learn) == (0.020, 0.006, True)
    assert link.compute_cost_s == pytest.approx(0.005)  # half the layers' speed for a read of 10 ms alone
    assert _link(probe | {"layer_compute_ms_while_loading": 3.0}).compute_cost_s == 0.0  # a copy engine's
    # learnt from there on as the runtime learns it, unless the probe's figure is to stay
    assert link.learn_compute_cost
    assert not _link(probe | {"layer_compute_ms_while_loading": 6.0}, "probe").learn_compute_cost


def test_value_rule_runs_are_made_once_per_compute_cost_pricing_interleaved(greedy_traces, tmp_path):
    policies = ("lru", "cost-aware+next-use:token")
    settings = _settings(
        tokens=4, cache_fractions=(0.5,), repeats=1, policies=policies, compute_cost=("learnt", "probe")
    )
    report = benchmark_offload(greedy_traces / "traces", [greedy_traces / "token"], settings, experts_dir=tmp_path)
    assert report["compute_cost"] == ["learnt", "probe"]
    rows = {(r["policy"], r["compute_cost"]): r["link_model"] for r in report["rows"]}
    assert set(rows) == {("lru", None), ("cost-aware+next-use", "learnt"), ("cost-aware+next-use", "probe")}
    assert rows["cost-aware+next-use", "learnt"]["compute_cost_learnt"]
    assert not rows["cost-aware+next-use", "probe"]["compute_cost_learnt"]
    with pytest.raises(InputError, match="--compute-cost: Input should be 'learnt' or 'probe'"):
        _settings(compute_cost=("guessed",))
