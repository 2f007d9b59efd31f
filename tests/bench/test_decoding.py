"""The tokens a measured replay decodes: windows of the test split in lockstep batches,
each slot one window in order, padded where a window ends; one at a time, the tokens in order."""

from types import SimpleNamespace

import numpy as np
import torch

from specmoe.bench.decoding import decode_steps
from specmoe.offload.simulated.simulator import NO_TOKEN
from specmoe.predictors.data import TraceDataset
from tests.predictors.synthetic import make_synthetic_store


def test_windows_decode_in_lockstep_batches_in_order(tmp_path):
    store = make_synthetic_store(tmp_path / "s", num_docs=60, tokens_per_doc=20)
    batches = list(TraceDataset(store, "test").iter_batches(10**6))  # one a shard
    test = SimpleNamespace(
        **{name: np.concatenate([getattr(b, name) for b in batches]) for name in ("windows", "positions")},
        expert_ids=torch.cat([b.expert_ids for b in batches]),
        token_ids=torch.cat([b.token_ids for b in batches]),
    )
    _, first = np.unique(test.windows, return_index=True)
    in_order = np.concatenate(
        [
            np.nonzero(test.windows == w)[0][np.argsort(test.positions[test.windows == w])]
            for w in test.windows[np.sort(first)]
        ]
    )  # windows as they come, each in position order
    single = decode_steps(store, 30, 1, 0)
    assert np.array_equal(single.routing[:, 0], test.expert_ids.numpy()[in_order][:30])
    assert np.array_equal(single.token_ids[:, 0], test.token_ids.numpy()[in_order][:30])
    batched = decode_steps(store, 30, 3, 0)
    assert batched.routing.shape[:2] == (len(batched), 3) and len(batched) <= 30
    for slot in range(3):
        windows = batched.windows[:, slot]
        live = windows >= 0
        assert np.all((batched.routing[:, slot, 0, 0] == NO_TOKEN) == ~live)
        for window in np.unique(windows[live]):  # each window's tokens in order, in one slot
            rows = test.windows == window
            steps = np.nonzero(windows == window)[0]
            order = np.argsort(test.positions[rows])
            assert np.array_equal(batched.routing[steps, slot], test.expert_ids.numpy()[rows][order][: len(steps)])
    first = [set(batched.windows[0])]
    assert len(first[0]) == 3  # three different windows decode together
