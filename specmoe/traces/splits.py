"""Document-level train/val/test splits (docs/design.md, "Evaluation protocol").

A seeded hash of each document's split key decides its side (80/10/10 by default). The
split key is the document's group from the corpus (parallel texts share one), merged with
near-duplicate clusters found here by MinHash over token 5-grams, so two copies of one text
can never sit on opposite sides.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from specmoe.traces.store import TraceStore

SPLITS = ("train", "val", "test")
_MERSENNE = (1 << 61) - 1


def hash_unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) determined by ``key`` and ``seed``."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    u = hash_unit(key, seed)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def minhash_signature(tokens: np.ndarray, num_hashes: int = 64, shingle: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash of the set of token ``shingle``-grams (universal hashing mod 2^61-1)."""
    if len(tokens) < shingle:
        shingles = np.array([hash(tuple(tokens.tolist())) & 0xFFFFFFFF], dtype=np.uint64)
    else:
        windows = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.uint64), shingle)
        shingles = np.unique((windows * np.uint64(1_000_003) ** np.arange(shingle, dtype=np.uint64)).sum(1))
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, num_hashes, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, num_hashes, dtype=np.uint64)
    hashed = (np.outer(shingles % np.uint64(1 << 31), a) + b) % np.uint64(_MERSENNE)
    return hashed.min(0)


def near_duplicate_groups(
    doc_tokens: dict[str, np.ndarray], *, bands: int = 16, rows: int = 4, threshold: float = 0.7
) -> dict[str, str]:
    """Map every document to a cluster representative; documents whose estimated Jaccard
    similarity of token 5-grams is >= ``threshold`` share one (LSH candidates, then verified)."""
    signatures = {doc: minhash_signature(tokens, bands * rows) for doc, tokens in doc_tokens.items()}
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for doc, sig in signatures.items():
        for band in range(bands):
            buckets[(band, sig[band * rows : (band + 1) * rows].tobytes())].append(doc)
    uf = _UnionFind()
    for docs in buckets.values():
        for other in docs[1:]:
            if (signatures[docs[0]] == signatures[other]).mean() >= threshold:
                uf.union(docs[0], other)
    return {doc: uf.find(doc) for doc in doc_tokens}


def assign_splits(
    store: TraceStore,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> dict[str, str]:
    """``doc_id -> "train" | "val" | "test"`` for every document in the store."""
    tokens: dict[str, list[np.ndarray]] = defaultdict(list)
    group_of: dict[str, str] = {}
    for shard in store.iter_shards():
        order = np.argsort(shard.doc_ids, kind="stable")
        docs, starts = np.unique(shard.doc_ids[order], return_index=True)
        for doc, part in zip(docs, np.split(order, starts[1:])):
            tokens[doc].append(shard.token_ids[part])
            group_of[doc] = shard.doc_groups[part[0]]
    clusters = near_duplicate_groups({doc: np.concatenate(parts) for doc, parts in tokens.items()})
    uf = _UnionFind()
    for doc in tokens:
        uf.union(f"group:{group_of[doc]}", f"group:{group_of[clusters[doc]]}")
    return {doc: split_of(uf.find(f"group:{group_of[doc]}"), seed, fractions) for doc in tokens}
