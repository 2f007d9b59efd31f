"""What a predictor may see: the leak-free :class:`Context` and the datasets that make it.

The prediction problem (docs/design.md): at token t, once MoE layers 0..l have run, predict the
experts of layers l+1..l+H. A predictor never receives a :class:`RoutingBatch` (which holds
every layer); it receives ``batch.context(l)``, whose tensors are cut at layer l, and the
earlier tokens' routing. Nothing of layers > l of the tokens under prediction is reachable
from a Context, so a predictor cannot leak the future even by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from specmoe.errors import InputError
from specmoe.traces.splits import assign_splits
from specmoe.traces.store import TraceStore

IGNORE = -2
"""Target id for "no target": beyond the last layer, or a token the router dropped."""


@dataclass(frozen=True)
class Context:
    """Everything known when predicting for N tokens after layer ``layer`` has run."""

    layer: int
    expert_ids: torch.Tensor  # (N, layer+1, k) long, -1 = dropped
    gate_weights: torch.Tensor  # (N, layer+1, k)
    token_ids: torch.Tensor  # (N,)
    prev_expert_ids: torch.Tensor  # (N, P, L, k): the P previous tokens of the window, all layers; IGNORE-padded
    hidden: torch.Tensor | None  # (N, layer+1, D) hidden states of layers <= layer, if the store has them
    num_layers: int
    num_experts: int

    def __len__(self) -> int:
        return self.expert_ids.shape[0]

    def select(self, rows) -> Context:
        """The same context for a subset of its tokens (an index, a mask or a slice)."""
        return replace(
            self,
            expert_ids=self.expert_ids[rows],
            gate_weights=self.gate_weights[rows],
            token_ids=self.token_ids[rows],
            prev_expert_ids=self.prev_expert_ids[rows],
            hidden=None if self.hidden is None else self.hidden[rows],
        )

    @classmethod
    def from_routing(
        cls,
        layer: int,
        expert_ids: torch.Tensor,
        gate_weights: torch.Tensor,
        token_ids: torch.Tensor,
        num_layers: int,
        num_experts: int,
        hidden: torch.Tensor | None = None,
        previous: torch.Tensor | None = None,
    ) -> Context:
        """What a decoding loop knows: these tokens' routing so far and, if it kept them, their
        hidden states (N, layer+1, D) of layers <= ``layer`` and the routing of earlier tokens
        (N, P, L, k), the most recent first (default: none)."""
        n, _, top_k = expert_ids.shape
        previous = torch.full((n, 0, num_layers, top_k), IGNORE) if previous is None else previous
        return cls(layer, expert_ids, gate_weights, token_ids, previous, hidden, num_layers, num_experts)


@dataclass(frozen=True)
class RoutingBatch:
    """N tokens' routing at every layer. Only the data pipeline and the metrics hold this."""

    expert_ids: torch.Tensor  # (N, L, k)
    gate_weights: torch.Tensor  # (N, L, k)
    token_ids: torch.Tensor  # (N,)
    prev_expert_ids: torch.Tensor  # (N, P, L, k)
    hidden: torch.Tensor | None  # (N, L, D)
    doc_ids: np.ndarray  # (N,)
    num_experts: int
    windows: np.ndarray | None = None  # (N,) window index, for replaying in decode order
    positions: np.ndarray | None = None  # (N,) position inside the window
    next_expert_ids: torch.Tensor | None = None
    """(N, L, k) routing of the token after each one in its window (IGNORE where there is none,
    or, in decoding traces, where the model did not choose it): the target of cross-token
    prediction. Never part of a Context."""
    next_token_ids: torch.Tensor | None = None
    """(N,) that token's id (IGNORE where there is none), to score next-token guesses."""

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    def __len__(self) -> int:
        return self.expert_ids.shape[0]

    def context(self, layer: int) -> Context:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside 0..{self.num_layers - 1}")
        cut = layer + 1
        return Context(
            layer,
            self.expert_ids[:, :cut].clone(),
            self.gate_weights[:, :cut].clone(),
            self.token_ids,
            self.prev_expert_ids,
            None if self.hidden is None else self.hidden[:, :cut].clone(),
            self.num_layers,
            self.num_experts,
        )

    def targets(self, layer: int, horizons: int) -> torch.Tensor:
        """(N, H, k) expert ids of layers layer+1..layer+H; IGNORE beyond the last layer."""
        out = torch.full((len(self), horizons, self.expert_ids.shape[2]), IGNORE, dtype=torch.long)
        for h in range(1, horizons + 1):
            if layer + h < self.num_layers:
                out[:, h - 1] = self.expert_ids[:, layer + h]
        return out


def _previous_tokens(expert_ids: np.ndarray, windows: np.ndarray, positions: np.ndarray, count: int) -> np.ndarray:
    """(T, count, L, k): routing of the ``count`` tokens before each token in its window."""
    t, layers, k = expert_ids.shape
    out = np.full((t, count, layers, k), IGNORE, dtype=np.int64)
    for back in range(1, count + 1):
        src = np.arange(t) - back
        ok = (src >= 0) & (positions >= back)
        ok[ok] &= windows[src[ok]] == windows[ok]
        out[ok, back - 1] = expert_ids[src[ok]]
    return out


def _next_tokens(
    expert_ids: np.ndarray, token_ids: np.ndarray, windows: np.ndarray, positions: np.ndarray, first_decoded: int
) -> tuple[np.ndarray, np.ndarray]:
    """(T, L, k) routing and (T,) id of the token after each token in its window, where that
    token sits at position >= ``first_decoded``; IGNORE elsewhere."""
    routing = np.full(expert_ids.shape, IGNORE, dtype=np.int64)
    ids = np.full(len(token_ids), IGNORE, dtype=np.int64)
    after = np.arange(1, len(expert_ids))
    ok = (windows[after] == windows[after - 1]) & (positions[after] == positions[after - 1] + 1)
    after = after[ok & (positions[after] >= first_decoded)]
    routing[after - 1], ids[after - 1] = expert_ids[after], token_ids[after]
    return routing, ids


class TraceDataset:
    """The tokens of one split of a trace store, streamed shard by shard.

    Args:
        store: an open :class:`TraceStore`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        seed: split seed (docs/design.md: a hash of the document decides its side).
        stack: which stack's layers (default: the store's first).
        previous_tokens: how many earlier tokens' routing each Context carries.
        hidden: ``None``, ``"router_input"`` or ``"residual_out"``.
    """

    def __init__(
        self,
        store: TraceStore,
        split: str = "all",
        *,
        seed: int = 0,
        stack: str | None = None,
        previous_tokens: int = 0,
        hidden: str | None = None,
        splits: dict[str, str] | None = None,
    ):
        if split not in ("train", "val", "test", "all"):
            raise ValueError(f"split must be train, val, test or all, got {split!r}")
        self.store = store
        self.split = split
        self.seed = seed
        self.stack = stack or store.default_stack()
        self.previous_tokens = previous_tokens
        self.hidden = hidden
        if hidden is not None and hidden not in store.manifest.collection.hidden:
            raise ValueError(
                f"store {store.directory} has no {hidden} states (has: {store.manifest.collection.hidden})"
            )
        self.splits = splits if splits is not None or split == "all" else assign_splits(store, seed)
        if split != "all" and split not in self.splits.values():
            sizes = {name: list(self.splits.values()).count(name) for name in ("train", "val", "test")}
            raise InputError(
                f"the {split} split of {store.directory} (split seed {seed}) holds no document: its "
                f"{len(self.splits)} documents split {sizes}; collect more documents"
            )

    def with_split(self, split: str) -> TraceDataset:
        return TraceDataset(
            self.store,
            split,
            seed=self.seed,
            stack=self.stack,
            previous_tokens=self.previous_tokens,
            hidden=self.hidden,
            splits=self.splits,
        )

    @property
    def num_layers(self) -> int:
        return self.store.manifest.model.stacks[self.stack].num_layers

    @property
    def num_experts(self) -> int:
        return self.store.manifest.model.num_experts

    @property
    def top_k(self) -> int:
        return self.store.manifest.model.top_k

    def _shard_batch(self, index: int) -> RoutingBatch | None:
        shard = self.store.read_shard(index, self.stack)
        keep = (
            np.ones(len(shard), dtype=bool)
            if self.split == "all"
            else np.array([self.splits[d] == self.split for d in shard.doc_ids])
        )
        if not keep.any():
            return None
        ids = shard.expert_ids.astype(np.int64)
        prev = _previous_tokens(ids, shard.windows, shard.positions, self.previous_tokens)[keep]
        collection = self.store.manifest.collection
        first_decoded = collection.seq_len - collection.generated_tokens if collection.mode == "greedy" else 0
        following, following_ids = _next_tokens(ids, shard.token_ids, shard.windows, shard.positions, first_decoded)
        hidden = None
        if self.hidden is not None:
            hidden = self.store.hidden_states(index, self.hidden, self.stack)[torch.from_numpy(keep)].float()
        return RoutingBatch(
            torch.from_numpy(ids[keep]),
            torch.from_numpy(shard.gate_weights[keep]),
            torch.from_numpy(shard.token_ids[keep].astype(np.int64)),
            torch.from_numpy(prev),
            hidden,
            shard.doc_ids[keep],
            self.num_experts,
            shard.windows[keep],
            shard.positions[keep],
            torch.from_numpy(following[keep]),
            torch.from_numpy(following_ids[keep]),
        )

    def iter_batches(self, batch_size: int = 4096, *, shuffle: bool = False, seed: int = 0) -> Iterator[RoutingBatch]:
        """Batches of up to ``batch_size`` tokens. With ``shuffle``, shard order and the
        tokens inside each shard are permuted (one shard in memory at a time)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.store.manifest.shards)) if shuffle else range(len(self.store.manifest.shards))
        for index in order:
            full = self._shard_batch(int(index))
            if full is None:
                continue
            perm = torch.from_numpy(rng.permutation(len(full))) if shuffle else torch.arange(len(full))
            for start in range(0, len(full), batch_size):
                rows = perm[start : start + batch_size]
                index = rows.numpy()
                yield RoutingBatch(
                    full.expert_ids[rows],
                    full.gate_weights[rows],
                    full.token_ids[rows],
                    full.prev_expert_ids[rows],
                    None if full.hidden is None else full.hidden[rows],
                    full.doc_ids[index],
                    full.num_experts,
                    full.windows[index],
                    full.positions[index],
                    full.next_expert_ids[rows],
                    full.next_token_ids[rows],
                )

    def num_tokens(self) -> int:
        return sum(len(b) for b in self.iter_batches(1 << 30))
