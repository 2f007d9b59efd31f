"""A decoding session times its layers for the link model: a layer with a prefetch read
beside it throughout and one with none are told apart, and what a read costs the layers is
learnt from the two."""

import time

from specmoe.offload.live.session import DecodingSession
from specmoe.offload.live.tiers import Transfer
from specmoe.offload.policy import POLICIES, Forecast, LinkModel
from tests.offload.live.test_prefetcher import _GatedExperts


def test_layers_beside_a_prefetch_read_and_alone_are_timed_apart_and_price_a_read():
    slow = _GatedExperts()
    link = LinkModel(read_s=0.1, layer_s=1.0, learn=True, learn_compute_cost=True, smoothing=1.0)  # the newest wins
    session = DecodingSession(
        Transfer(slow), 10**6, num_layers=3, prefetching=True, rule=POLICIES["cost-aware"], link=link
    )
    try:
        session.begin_layer(0, 0, [0])
        session.submit(lambda: Forecast(0, (((2, 1), 2, 1.0),)), keep=True)  # its read waits at the gate
        assert slow.reading.wait(5)
        session.begin_layer(0, 1, [0])  # the layer from here on runs beside the read throughout
        time.sleep(0.2)
        session.begin_layer(0, 2, [1])
        beside = link.layer_beside_read_s
        assert beside is not None and beside >= 0.2
        slow.gate.set()
        assert session.prefetcher.wait_for((2, 1)) or (2, 1) in session.tier
        time.sleep(0.1)  # the read ended as this layer began: it ran alone
        session.begin_layer(1, 0, [0])
        time.sleep(0.1)
        session.begin_layer(1, 1, [0])
    finally:
        session.close()
    assert 0.1 <= link.layer_alone_s < beside and link.layer_beside_read_s == beside
    assert link.compute_cost_s == link.observed_compute_cost() > 0
    assert session.results()["link_model"]["compute_cost_ms"] == 1e3 * link.compute_cost_s
