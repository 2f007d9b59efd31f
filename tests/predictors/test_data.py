"""The datasets behind the leak-free Context: next-token targets for cross-token prediction."""

import numpy as np
import torch

from specmoe.predictors.data import IGNORE, TraceDataset


def test_next_token_routing_is_the_following_row_of_the_same_window(synthetic_store):
    batch = next(TraceDataset(synthetic_store, "all").iter_batches(1 << 20))
    same_window = np.append(batch.windows[1:] == batch.windows[:-1], False)
    follows = torch.from_numpy(same_window)
    torch.testing.assert_close(batch.next_expert_ids[:-1][follows[:-1]], batch.expert_ids[1:][follows[:-1]])
    torch.testing.assert_close(batch.next_token_ids[:-1][follows[:-1]], batch.token_ids[1:][follows[:-1]])
    assert (batch.next_expert_ids[~follows] == IGNORE).all() and (batch.next_token_ids[~follows] == IGNORE).all()
    context = batch.context(batch.num_layers - 1)
    assert not any(value is batch.next_expert_ids for value in vars(context).values())


def test_decoding_traces_keep_only_tokens_the_model_chose_as_targets(synthetic_store, monkeypatch):
    collection = synthetic_store.manifest.collection
    monkeypatch.setattr(collection, "mode", "greedy")
    monkeypatch.setattr(collection, "generated_tokens", 16)
    batch = next(TraceDataset(synthetic_store, "all").iter_batches(1 << 20))
    first_decoded = collection.seq_len - 16
    has_target = (batch.next_expert_ids[:, 0, 0] >= 0).numpy()
    assert not has_target[batch.positions < first_decoded - 1].any()  # the next token is prompt text
    assert has_target[(batch.positions >= first_decoded - 1) & (batch.positions < collection.seq_len - 1)].all()
