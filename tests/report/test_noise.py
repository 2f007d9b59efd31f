"""The report does not rank noise: measured rows carry the spread of their repeats, and a
spread larger than the policies' differences, an oracle that is not the fastest, or a busy
machine are said in plain words."""

from specmoe.report.results import noise_warnings, with_spread


def _row(policy, seconds, stalls):
    return {
        "policy": policy,
        "cache_fraction": 0.25,
        "tokens": 10,
        "seconds": sorted(seconds)[len(seconds) // 2],
        "tokens_per_s": 10 / sorted(seconds)[len(seconds) // 2],
        "seconds_all_repeats": seconds,
        "stall_ms_per_token_all_repeats": stalls,
        "stall_fraction": 0.1,
    }


def test_rows_carry_the_range_of_their_repeats():
    row = with_spread([_row("lru", [1.0, 2.0, 1.25], [3.0, 1.0, 2.0])])[0]
    assert row["tokens_per_s_range"] == [5.0, 10.0]
    assert row["stall_ms_per_token"] == 2.0 and row["stall_ms_per_token_range"] == [1.0, 3.0]


def test_noise_larger_than_the_differences_and_a_slow_oracle_are_said():
    steady = {"rows": [_row("lru", [1.0, 1.01], [1, 1]), _row("oracle", [0.5, 0.51], [0, 0])]}
    assert noise_warnings(steady) == []
    noisy = {"rows": [_row("lru", [1.0, 2.0], [1, 1]), _row("oracle", [1.5, 2.5], [0, 0])]}
    warnings = noise_warnings(
        noisy | {"machine": {"interference": {"layer_compute_ms": 1.0, "layer_compute_ms_while_loading": 2.0}}}
    )
    assert any("do not rank them here" in w for w in warnings)
    assert any("oracle was not the fastest" in w for w in warnings)
    assert any("2.0x slower while an expert was being read" in w for w in warnings)
