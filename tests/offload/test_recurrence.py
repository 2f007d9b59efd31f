import numpy as np
import pytest

from specmoe.offload.eviction import eviction_policy
from specmoe.offload.forecast import Outlook
from specmoe.offload.recurrence import Recurrence

LAYERS = 2


def routing_of(*experts_per_layer):
    """(1, L, 1): one slot's experts, one per layer."""
    return np.array([[[e] for e in experts_per_layer]])


def decode(recurrence, tokens, experts, sequence=0, start=0):
    """Feed one sequence's tokens with the experts each uses (one per layer)."""
    for step, (token, used) in enumerate(zip(tokens, experts), start):
        recurrence.begin_token(step, [token], [sequence])
        recurrence.end_token(routing_of(*used))


def test_a_repeated_suffix_forecasts_what_followed_it_last_time():
    recurrence = Recurrence(LAYERS, suffix=2, reach=2)
    decode(recurrence, [5, 6, 7, 8], [(0, 1), (2, 3), (4, 5), (6, 7)])
    recurrence.begin_token(4, [6], [0])  # 6 came before 7 and 8
    first, second = recurrence.ahead
    assert first.listed == {(0, 4), (1, 5)} and second.listed == {(0, 6), (1, 7)}
    said, listed = recurrence.chances(np.array([0, 0, 1]), np.array([4, 6, 5]), np.array([5, 6, 5]))
    assert listed.tolist() == [True, True, True]
    assert said[0] == pytest.approx(0.8)  # the prior, nothing scored yet
    # the longest suffix wins: "8 6" never occurred, "6" did
    assert recurrence.found[0] == 1


def test_no_match_says_nothing():
    recurrence = Recurrence(LAYERS)
    decode(recurrence, [1, 2, 3], [(0, 0), (1, 1), (2, 2)])
    assert recurrence.ahead == [None] * recurrence.reach
    said, listed = recurrence.chances(np.array([0]), np.array([0]), np.array([3]))
    assert np.isnan(said[0]) and not listed[0]
    assert recurrence.chance((0, 0), 3, rate=0.3) is None


def test_its_chances_are_counted_as_decoding_goes():
    recurrence = Recurrence(LAYERS, suffix=1, reach=1)
    loop = [(1, 2), (3, 4)]
    decode(recurrence, [9, 10] * 20, loop * 20)  # right every time
    right = recurrence.chance_listed(1)
    assert right > 0.95
    assert recurrence.chance_other(1) < 0.01  # what it left out was never used
    # the same loop whose experts change every time: the listed ones are never used again
    fresh = Recurrence(LAYERS, suffix=1, reach=1)
    decode(fresh, [9, 10] * 20, [(i % 7, (i + 3) % 7) for i in range(40)])
    assert fresh.chance_listed(1) < right


def test_a_forecast_for_a_batch_says_nothing_of_unlisted_experts_unless_every_sequence_matched():
    recurrence = Recurrence(LAYERS, suffix=1, reach=1)
    for step, (a, b) in enumerate([(1, 7), (2, 8), (1, 9)]):
        recurrence.begin_token(step, [a, b], [0, 1])
        recurrence.end_token(np.array([[[a], [a]], [[b], [b]]]))
    (ahead,) = recurrence.ahead  # sequence 0 repeats "1", sequence 1 does not
    assert ahead.listed == {(0, 2), (1, 2)} and ahead.chance_other is None
    assert recurrence.chance((0, 3), 3, rate=0.5) is None
    assert recurrence.next_token(upto_layer=1) == ([], [])  # no reads on a partial forecast
    recurrence.begin_token(3, [2, -2], [0, -2])  # sequence 1 has ended: forgotten
    assert set(recurrence.tokens) == {0}
    assert recurrence.ahead[0] is not None and recurrence.ahead[0].chance_other is not None


def test_next_token_rows_cover_the_layers_already_passed():
    recurrence = Recurrence(LAYERS, suffix=1, reach=1)
    decode(recurrence, [3, 4, 3], [(0, 1), (2, 3), (0, 1)])
    entries, rest = recurrence.next_token(upto_layer=0)
    assert entries == [((0, 2), 3 * LAYERS + 0, pytest.approx(0.8))]
    assert [position for position, _ in rest] == [3 * LAYERS]


def test_eviction_keeps_what_the_recurrence_says_the_next_tokens_use():
    policy = eviction_policy("next-use", LAYERS)
    outlook: Outlook = policy.outlook
    outlook.recurrence = Recurrence(LAYERS, suffix=1, reach=2)
    decode(outlook.recurrence, [3, 4, 5, 3], [(0, 0), (1, 1), (2, 2), (0, 0)])
    for key in [(0, 1), (0, 2)]:  # used alike: the same rate
        outlook.on_use(key, 0)
        policy.on_use(key, 0)
    position = 3 * LAYERS + 1
    waits = outlook.expected_waits([(0, 1), (0, 2)], position)
    assert waits[0] < waits[1]  # (0, 1) follows "3" next time, (0, 2) only the token after
    assert policy.victim([(0, 1), (0, 2)], position) == (0, 2)
    without = eviction_policy("next-use", LAYERS).outlook
    for key in [(0, 1), (0, 2)]:
        without.on_use(key, 0)
    alike = without.expected_waits([(0, 1), (0, 2)], position)
    assert alike[0] == alike[1]  # without it, nothing tells them apart


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="suffix >= 1"):
        Recurrence(LAYERS, suffix=0)


def test_this_token_is_forecast_from_the_token_that_ended_the_same_suffix():
    recurrence = Recurrence(LAYERS, suffix=1, reach=1)
    decode(recurrence, [3, 4, 3], [(0, 1), (2, 3), (0, 1)])
    recurrence.begin_token(3, [4], [0])  # "4" ended the suffix at step 1, which used (2, 3)
    entries, rest = recurrence.this_token(after_layer=0)
    assert entries == [((1, 3), 3 * LAYERS + 1, pytest.approx(recurrence.chance_listed(0)))]
    assert [position for position, _ in rest] == [3 * LAYERS + 1]
    assert recurrence.chance_listed(0) > 0.8  # the forecasts of steps 2 and 3 were right


def test_a_forecast_joined_with_the_recurrence_keeps_the_likelier_chance_and_the_tighter_bound():
    from specmoe.offload.forecast import Forecast
    from specmoe.offload.policy import with_recurrence

    recurrence = Recurrence(LAYERS, suffix=1, reach=1)
    decode(recurrence, [3, 4, 3], [(0, 1), (2, 3), (0, 1)])
    recurrence.begin_token(3, [4], [0])
    made_at = 3 * LAYERS  # layer 0 of step 3 has routed
    forecast = Forecast(made_at, (((1, 3), made_at + 1, 0.1), ((1, 5), made_at + 1, 0.4)), ((made_at + 1, 0.3),))
    joined = with_recurrence(forecast, recurrence, made_at)
    chances = {key: q for key, _, q in joined.entries}
    assert chances[(1, 3)] == pytest.approx(recurrence.chance_listed(0))  # likelier than 0.1
    assert chances[(1, 5)] == 0.4
    assert dict(joined.rest)[made_at + 1] == pytest.approx(min(0.3, recurrence.chance_other(0)))
    assert ((0, 0), (3 + 1) * LAYERS, pytest.approx(recurrence.chance_listed(1))) in joined.entries  # next token
