"""Transfers from the slow tier: on CPU a stored expert is copied, never handed out; on a GPU,
demand copies have a stream of their own that outranks the prefetch stream."""

import pytest
import torch

from specmoe.offload.live.tiers import HostExperts, Transfer


def _host():
    return HostExperts({0: [[torch.arange(6.0).view(2, 3)], [torch.ones(2, 3)]]})


@pytest.mark.parametrize("demand", [False, True])
def test_a_cpu_transfer_copies_the_stored_expert(demand):
    slow = _host()
    loaded = Transfer(slow).load((0, 0), demand=demand)
    assert torch.equal(loaded.tensors[0], slow.read(0, 0)[0])
    assert loaded.tensors[0].data_ptr() != slow.read(0, 0)[0].data_ptr()
    assert loaded.ready is None


@pytest.mark.gpu
def test_a_demand_copy_runs_on_its_own_higher_priority_stream():
    transfer = Transfer(HostExperts({0: [[torch.arange(6.0).view(2, 3)]]}, pin=True), "cuda")
    assert transfer.demand_stream.priority < transfer.stream.priority
    demand, prefetch = transfer.load((0, 0), demand=True), transfer.load((0, 0))
    demand.wait_host()
    prefetch.wait_host()
    for loaded in (demand, prefetch):
        assert loaded.tensors[0].is_cuda and torch.equal(loaded.tensors[0].cpu(), torch.arange(6.0).view(2, 3))
    transfer.close()
