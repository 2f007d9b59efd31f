"""Sparse count tables: ``key -> counts over experts``, for n-gram and token-id predictors
whose dense tables would not fit (e.g. 150k tokens x 48 layers x 128 experts)."""

from __future__ import annotations

import numpy as np
import torch


class SparseCounts:
    """Accumulates (key, expert, weight) triples; after :meth:`freeze`, looks keys up in bulk."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.keys: np.ndarray | None = None  # (M,) sorted unique keys
        self.offsets: np.ndarray | None = None  # (M+1,)
        self.experts: np.ndarray | None = None  # (nnz,)
        self.counts: np.ndarray | None = None  # (nnz,)

    def add(self, keys: np.ndarray, experts: np.ndarray, weights: np.ndarray | None = None) -> None:
        ok = experts >= 0
        code = keys[ok].astype(np.int64) * self.num_experts + experts[ok]
        uniq, inverse = np.unique(code, return_inverse=True)
        mass = np.ones(len(code)) if weights is None else weights[ok]
        self._parts.append((uniq, np.bincount(inverse, weights=mass, minlength=len(uniq))))

    def freeze(self) -> SparseCounts:
        codes = np.concatenate([p[0] for p in self._parts]) if self._parts else np.zeros(0, np.int64)
        cnts = np.concatenate([p[1] for p in self._parts]) if self._parts else np.zeros(0)
        uniq, inverse = np.unique(codes, return_inverse=True)
        totals = np.bincount(inverse, weights=cnts, minlength=len(uniq))
        keys, experts = np.divmod(uniq, self.num_experts)
        self.keys, starts = np.unique(keys, return_index=True)
        self.offsets = np.append(starts, len(keys)).astype(np.int64)
        self.experts, self.counts = experts.astype(np.int64), totals.astype(np.float32)
        self._parts = []
        return self

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Dense (N, E) counts for ``keys`` (zeros for unseen keys)."""
        out = np.zeros((len(keys), self.num_experts), dtype=np.float32)
        if self.keys is None or len(self.keys) == 0:
            return out
        pos = np.searchsorted(self.keys, keys)
        pos_clip = np.minimum(pos, len(self.keys) - 1)
        found = self.keys[pos_clip] == keys
        rows = np.nonzero(found)[0]
        starts, ends = self.offsets[pos_clip[rows]], self.offsets[pos_clip[rows] + 1]
        lengths = ends - starts
        row_of_entry = np.repeat(rows, lengths)
        entry = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        out[row_of_entry, self.experts[entry]] = self.counts[entry]
        return out

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.keys": torch.from_numpy(self.keys),
            f"{prefix}.offsets": torch.from_numpy(self.offsets),
            f"{prefix}.experts": torch.from_numpy(self.experts),
            f"{prefix}.counts": torch.from_numpy(self.counts),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], prefix: str, num_experts: int) -> SparseCounts:
        table = cls(num_experts)
        table.keys = tensors[f"{prefix}.keys"].numpy()
        table.offsets = tensors[f"{prefix}.offsets"].numpy()
        table.experts = tensors[f"{prefix}.experts"].numpy()
        table.counts = tensors[f"{prefix}.counts"].numpy()
        return table

    def num_entries(self) -> int:
        return 0 if self.counts is None else len(self.counts)
