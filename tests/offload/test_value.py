"""Prefetch by value: a read is made when the stall it is expected to save beats what it
costs the link and the fast tier, so how many reads a layer gets follows from the times
and the probabilities; and the outlook and link model it prices with."""

import pytest

from specmoe.offload.eviction import eviction_policy
from specmoe.offload.forecast import Forecast, LinkModel, Outlook, pooled
from specmoe.offload.residency import PrefetchQueue, Residency
from specmoe.offload.value import choose_by_value

NOW = 40  # decode position: step 5 of 8 layers, layer 0


def _choose(candidates, *, link, queue=None, residency=None, busy_s=0.0):
    residency = residency or Residency(100, eviction_policy("lru", num_layers=8))
    queue = queue or PrefetchQueue()
    forecast = Forecast(NOW, tuple(candidates))
    return choose_by_value(
        forecast,
        position=NOW,
        queue=queue,
        residency=residency,
        link=link,
        nbytes=lambda layer: 1,
        present=residency.__contains__,
        busy_s=busy_s,
    )


def _per_layer(chosen) -> dict[int, int]:
    counts = {}
    for _, position, _ in chosen:
        counts[position - NOW] = counts.get(position - NOW, 0) + 1
    return counts


def test_how_many_reads_a_layer_gets_follows_from_how_many_fit_in_the_compute_before_it():
    candidates = [((ahead, e), NOW + ahead, 0.9) for ahead in (1, 2, 3) for e in range(4)]
    # a read takes a layer's compute: one read per layer arrives in time
    assert _per_layer(_choose(candidates, link=LinkModel(read_s=1.0, layer_s=1.0))) == {1: 1, 2: 1, 3: 1}
    # twice the compute per layer, twice the reads
    assert _per_layer(_choose(candidates, link=LinkModel(read_s=1.0, layer_s=2.0))) == {1: 2, 2: 2, 3: 2}
    # a link still busy for a read holds everything back by one
    assert _per_layer(_choose(candidates, link=LinkModel(read_s=1.0, layer_s=1.0), busy_s=1.0)) == {2: 1, 3: 1}
    # an instant link: nothing is worth prefetching, a demand read costs nothing
    assert _choose(candidates, link=LinkModel(read_s=0.0, layer_s=1.0)) == []


def test_where_a_read_slows_the_layers_beside_it_only_likely_reads_are_worth_it():
    candidates = [((3, 0), NOW + 3, 0.9), ((3, 1), NOW + 3, 0.4), ((3, 2), NOW + 3, 0.2)]
    free = LinkModel(read_s=1.0, layer_s=1.0)  # a copy engine: reading costs the layers nothing
    assert [key for key, _, _ in _choose(candidates, link=free)] == [(3, 0), (3, 1), (3, 2)]
    # a layer takes 2 beside a read, 1 alone: a read's time costs the layers half of it
    cost = LinkModel.compute_cost_of(read_s=1.0, layer_alone_s=1.0, layer_beside_read_s=2.0)
    assert cost == pytest.approx(0.5)
    assert LinkModel.compute_cost_of(read_s=1.0, layer_alone_s=2.0, layer_beside_read_s=1.5) == 0.0
    taxed = LinkModel(read_s=1.0, layer_s=1.0, compute_cost_s=cost)
    assert [key for key, _, _ in _choose(candidates, link=taxed)] == [(3, 0)]
    with pytest.raises(ValueError, match="compute_cost_s >= 0"):
        LinkModel(read_s=1.0, layer_s=1.0, compute_cost_s=-1.0)


def test_the_likeliest_read_goes_first_and_a_late_one_is_worth_what_it_still_saves():
    link = LinkModel(read_s=1.0, layer_s=0.6)
    chosen = _choose([((1, 0), NOW + 1, 0.3), ((1, 1), NOW + 1, 0.8)], link=link)
    # the first read is late by 0.4 of a read and still saves 0.6; the second would save nothing
    assert chosen == [((1, 1), NOW + 1, 0.8)]


def test_a_read_that_makes_queued_reads_late_must_be_worth_more_than_they_lose():
    link = LinkModel(read_s=1.0, layer_s=1.0)
    for queued_probability, taken in ((1.0, False), (0.2, True)):
        queue = PrefetchQueue()
        queue.request(
            [((2, 0), NOW + 2), ((2, 1), NOW + 2)], lambda key: False, NOW, {(2, 0): 1.0, (2, 1): queued_probability}
        )
        chosen = _choose([((1, 5), NOW + 1, 0.5)], link=link, queue=queue)
        assert bool(chosen) == taken


def test_a_read_that_evicts_an_expert_likely_needed_soon_is_not_made():
    link = LinkModel(read_s=1.0, layer_s=4.0)
    for victim_chance, taken in ((0.95, False), (0.05, True)):
        residency = Residency(1, eviction_policy("lru", num_layers=8))
        residency.admit((3, 7), None, 1, prefetch=False)
        residency.use((3, 7))
        residency.outlook.observe(Forecast(NOW, (((3, 7), NOW + 3, victim_chance),)))
        chosen = _choose([((2, 0), NOW + 2, 0.5)], link=link, residency=residency)
        assert bool(chosen) == taken


def test_experts_held_or_queued_are_not_read_again():
    residency = Residency(10, eviction_policy("lru", num_layers=8))
    residency.admit((1, 0), None, 1, prefetch=False)
    queue = PrefetchQueue()
    queue.request([((2, 0), NOW + 2)], lambda key: False, NOW)
    candidates = [((1, 0), NOW + 1, 0.9), ((2, 0), NOW + 2, 0.9), ((3, 0), NOW + 3, 0.9), ((0, 0), NOW, 0.9)]
    chosen = _choose(candidates, link=LinkModel(1.0, 2.0), residency=residency, queue=queue)
    assert chosen == [((3, 0), NOW + 3, 0.9)]  # position NOW is being decoded: too late


def test_the_queue_is_in_deadline_order_and_keeps_each_requests_probability():
    queue = PrefetchQueue()
    queue.request([((3, 0), 3), ((1, 0), 1)], lambda key: False, 0, {(3, 0): 0.5, (1, 0): 0.25})
    queue.request([((2, 0), 2), ((1, 1), 1)], lambda key: False, 0)
    assert queue.entries == [((1, 0), 1), ((1, 1), 1), ((2, 0), 2), ((3, 0), 3)]
    assert queue.probability == {(3, 0): 0.5, (1, 0): 0.25, (2, 0): 1.0, (1, 1): 1.0}
    assert queue.pop() == ((1, 0), 1) and (1, 0) not in queue.probability


def test_the_outlooks_use_rate_is_one_for_an_expert_used_every_token_and_decays():
    outlook = Outlook(num_layers=4, half_life_tokens=2)
    for step in range(200):
        outlook.on_use((1, 0), step * 4 + 1)
    assert outlook.rate((1, 0), 199 * 4 + 1) == pytest.approx(1.0, abs=1e-6)
    assert outlook.rate((1, 0), 203 * 4 + 1) == pytest.approx(0.25, abs=1e-3)  # two half-lives later
    assert outlook.rate((1, 1), 10) == 0.0
    assert outlook.next_opportunity((1, 0), 5) == 9 and outlook.next_opportunity((1, 0), 4) == 5
    # expected wait: the next opportunity, else a token's worth of layers per 1/rate
    assert outlook.expected_wait((1, 0), 199 * 4 + 1) == pytest.approx(4.0, abs=1e-4)


def test_a_batch_needs_an_expert_if_any_of_its_tokens_does():
    assert pooled([[[0.5, 0.0]], [[0.5, 1.0]]]).tolist() == [[0.75, 1.0]]


def test_a_learning_link_model_follows_what_it_observes():
    link = LinkModel(read_s=1.0, layer_s=1.0, learn=True)
    for _ in range(100):
        link.observe_read(3.0)
        link.observe_layer(0.5)
    assert link.read_s == pytest.approx(3.0, rel=1e-3) and link.layer_s == pytest.approx(0.5, rel=1e-3)
    assert link.demand_wait_s == pytest.approx(1.5, rel=1e-3)  # half a read, as it began
    fixed = LinkModel(read_s=1.0, layer_s=1.0)
    fixed.observe_read(3.0)
    assert fixed.read_s == 1.0


def test_a_link_model_learns_what_a_read_costs_the_layers_beside_it():
    link = LinkModel(read_s=1.0, layer_s=1.0, learn=True, learn_compute_cost=True)
    for _ in range(100):
        link.observe_layer(1.0, beside_read=0.0)
        assert link.compute_cost_s == 0.0  # until a layer beside a read is seen, as given
    for _ in range(100):
        link.observe_layer(2.0, beside_read=1.0)
        link.observe_layer(9.0, beside_read=0.5)  # partly beside a read: neither time
        link.observe_layer(9.0)  # not known (the layer waited for a read)
    assert link.layer_alone_s == pytest.approx(1.0) and link.layer_beside_read_s == pytest.approx(2.0)
    assert link.compute_cost_s == pytest.approx(0.5)  # a read's time costs the layers half of it
    assert link.to_dict()["compute_cost_ms"] == pytest.approx(500.0)
    probed = LinkModel(read_s=1.0, layer_s=1.0, compute_cost_s=0.25, learn=True)  # bench offload's: fixed by its probe
    for seconds, beside in ((1.0, 0.0), (2.0, 1.0)):
        probed.observe_layer(seconds, beside_read=beside)
    assert probed.compute_cost_s == 0.25 and probed.observed_compute_cost() == pytest.approx(0.5)


def test_residents_are_ranked_for_eviction_only_when_a_read_worth_its_cost_needs_a_victim():
    residency = Residency(2, eviction_policy("lru", num_layers=8))
    for key in ((0, 0), (0, 1)):
        residency.admit(key, None, 1, prefetch=False)
    ranked = []
    victims = residency.victims
    residency.victims = lambda count: ranked.append(count) or victims(count)
    taxed = LinkModel(read_s=1.0, layer_s=4.0, compute_cost_s=0.5)
    assert _choose([((3, 0), NOW + 3, 0.4)], link=taxed, residency=residency) == []
    assert ranked == []  # 0.4 of a read cannot pay the 0.5 every read costs
    assert _choose([((3, 0), NOW + 3, 0.4), ((3, 1), NOW + 3, 0.99)], link=taxed, residency=residency)
    assert ranked == [1]  # the one candidate that might pay needed a victim
