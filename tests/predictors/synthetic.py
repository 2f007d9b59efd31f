"""A synthetic trace store with planted routing structure, written through the real store API."""

from __future__ import annotations

import numpy as np
import torch

import specmoe
from specmoe.predictors.registry import make_predictor
from specmoe.traces.schema import CollectionInfo, Manifest, ModelInfo, StackInfo, TokenizerInfo
from specmoe.traces.store import TraceStore, routing_table


def make_synthetic_store(
    directory,
    *,
    num_docs=40,
    tokens_per_doc=64,
    num_layers=4,
    num_experts=16,
    top_k=2,
    noise=0.0,
    seed=0,
    windows_per_shard=8,
) -> TraceStore:
    """Layer 0's top-1 expert is a function of the token id; layer l+1's top-1 is
    ``(3 * e_l + l + 1) % E`` (with probability ``1 - noise``); the other slots follow
    ``(e + 5) % E``. Predictors that use the previous layer can therefore reach ~100%."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        specmoe_version=specmoe.__version__,
        model=ModelInfo(
            id="synthetic",
            model_type="synthetic",
            num_experts=num_experts,
            top_k=top_k,
            hidden_size=8,
            stacks={"decoder": StackInfo(num_layers=num_layers, block_names=[f"l{i}" for i in range(num_layers)])},
            dtype="float32",
        ),
        tokenizer=TokenizerInfo(name_or_path="synthetic", vocab_size=50),
        collection=CollectionInfo(
            texts=["synthetic"],
            seq_len=tokens_per_doc,
            batch_size=1,
            windows_per_shard=windows_per_shard,
            max_tokens=None,
            fingerprint="synthetic",
        ),
    )
    store = TraceStore(directory, manifest)
    manifest.save(directory)
    for shard_index, first_doc in enumerate(range(0, num_docs, windows_per_shard)):
        docs = range(first_doc, min(first_doc + windows_per_shard, num_docs))
        n = len(docs) * tokens_per_doc
        tokens = rng.integers(0, 50, n)
        ids = np.zeros((n, num_layers, top_k), dtype=np.int64)
        ids[:, 0, 0] = tokens % num_experts
        for layer in range(1, num_layers):
            nxt = (3 * ids[:, layer - 1, 0] + layer) % num_experts
            flip = rng.random(n) < noise
            ids[:, layer, 0] = np.where(flip, rng.integers(0, num_experts, n), nxt)
        for slot in range(1, top_k):
            ids[:, :, slot] = (ids[:, :, slot - 1] + 5) % num_experts
        weights = np.sort(rng.random((n, num_layers, top_k)), -1)[..., ::-1].astype(np.float32)
        columns = {
            "doc_id": np.repeat([f"doc{d}" for d in docs], tokens_per_doc),
            "doc_group": np.repeat([f"doc{d}" for d in docs], tokens_per_doc),
            "window": np.repeat(np.array(list(docs)), tokens_per_doc),
            "position": np.tile(np.arange(tokens_per_doc), len(docs)),
            "token_id": tokens,
        }
        store.write_shard(shard_index, routing_table(columns, {"decoder": (ids, weights)}), {}, docs[0], len(docs))
    manifest.complete = True
    manifest.save(directory)
    return TraceStore.open(directory)


def save_popularity(directory, num_layers, num_experts):
    """A saved popularity predictor fitted (uniformly) for ``num_layers`` x ``num_experts``."""
    predictor = make_predictor("popularity")
    predictor.load_state_tensors(
        {"popularity": torch.ones(num_layers, num_experts)},
        {"num_layers": num_layers, "num_experts": num_experts, "top_k": 1},
    )
    return predictor.save(directory)
