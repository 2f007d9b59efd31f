"""The offload policy, written once: what a fast tier keeps, what it prefetches, what the
oracle sees, and when a requested read is no longer worth making.

Decoding runs layer by layer; at each MoE layer it needs the experts its tokens were routed
to. Everything is ordered by decode position, ``step * num_layers + layer``: a prefetch is
requested for a position and is stale once decoding has reached it without starting the
read. The same rules serve both clocks:

- :mod:`specmoe.offload.simulated` runs them under a cost model (a SIMULATION: no weights
  move), and
- :mod:`specmoe.offload.live` with real reads on a prefetch thread (the measured replay in
  :mod:`specmoe.bench.replay` and the model runtime),

so "simulated against measured" compares one model under two clocks, and a decision-parity
test holds the two to the same decisions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np
from pydantic import Field

from specmoe.errors import InputError
from specmoe.offload import Key
from specmoe.offload.eviction import EVICTIONS, EvictionPolicy
from specmoe.settings import Settings

Request = tuple[Key, int]
"""A prefetch request: the expert, and the decode position whose layer needs it."""
EventLog = list[tuple]
"""Decisions in the order made (``("admit", key, prefetch)``, ``("evict", key)``,
``("request", key, position)``, ``("drop", key, position)``, ``("hit" | "late" | "miss",
key)``): what the parity tests compare between the simulator and the measured engines."""


# --- what a policy is ----------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    name: str
    prefetch: Literal["none", "predictor", "oracle"]
    eviction: str | None
    """None: the prefetch settings' ``eviction``."""
    description: str
    keeps_experts: bool = True
    """False for on-demand, which drops every expert once its layer has run."""
    next_token: bool = False
    """Also prefetch the next token's first layers from a guess of that token."""

    def eviction_for(self, settings: PrefetchSettings) -> str:
        return self.eviction or settings.eviction


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("on-demand", "none", "lru", "load what each layer needs and keep nothing (the floor)", False),
        Policy("lru", "none", "lru", "cache, least recently used evicted"),
        Policy("lfu", "none", "lfu", "cache, least frequently used evicted"),
        Policy("lrfu", "none", "lrfu", "cache, least by frequency decaying with a 16-token half-life"),
        Policy("belady", "none", "belady", "cache evicting by the recorded future (caching's offline optimum)"),
        Policy("prefetch", "predictor", None, "a predictor's guesses prefetched"),
        Policy(
            "prefetch+next-token",
            "predictor",
            None,
            "prefetch, and the next token's first layers from a guess of that token",
            next_token=True,
        ),
        Policy("oracle-prefetch", "oracle", None, "the recorded future prefetched, evicted as prefetch evicts"),
        Policy("oracle", "oracle", "belady", "the recorded future prefetched and evicted by (the ceiling)"),
    )
}


def policy_named(name: str) -> Policy:
    if name not in POLICIES:
        raise InputError(f"unknown offload policy {name!r}; policies: {', '.join(POLICIES)}")
    return POLICIES[name]


class PrefetchSettings(Settings):
    """How prefetching policies prefetch. ``resolve`` fills the defaults that depend on the
    model, once, for every engine."""

    layers_ahead: int = Field(
        1, ge=1, description="Prefetch for layers l+1..l+N of a token once its layer l has routed."
    )
    experts_per_layer: int | None = Field(
        None, ge=1, description="At most this many experts per target layer (default: 2 x top-k)."
    )
    min_probability: float = Field(
        0.0, ge=0.0, le=1.0, description="Prefetch only experts that some token gives at least this probability."
    )
    eviction: Literal[EVICTIONS] = Field("lru", description="Eviction with prefetch and oracle-prefetch.")
    oracle_reach: int | None = Field(
        None, ge=1, description="Layers the oracle reads ahead in decode order, into the next token (default: L-1)."
    )

    def resolve(self, *, top_k: int, num_layers: int) -> PrefetchSettings:
        """The settings for a stack of ``num_layers`` MoE layers routing ``top_k`` experts.

        The oracle reads at most L-1 layers ahead: a prefetch is keyed by layer, so reading
        L ahead would name the running layer of the next token. With one MoE layer it reads none."""
        limit = max(num_layers - 1, 1)
        reach = limit if self.oracle_reach is None else self.oracle_reach
        if reach > limit:
            raise InputError(f"--oracle-reach must be in [1, {limit}] for {num_layers} MoE layers, got {reach}")
        return self.model_copy(
            update={
                "experts_per_layer": self.experts_per_layer or 2 * top_k,
                "oracle_reach": min(reach, num_layers - 1),
            }
        )


# --- what to prefetch ----------------------------------------------------------------------
def choose_prefetches(probs, target_layers: Iterable[int], per_layer: int, min_probability: float = 0.0) -> list[Key]:
    """The experts worth prefetching, from per-token probabilities (N, H, E) whose horizon h
    predicts layer ``target_layers[h]``: per layer, the ``per_layer`` experts with the most
    expected uses across the N tokens, most first (ties to the lower id), skipping any that
    no token gives at least ``min_probability``. In numpy: at these sizes a torch call costs
    more than the work, and decoding asks at every layer."""
    targets = list(target_layers)
    if hasattr(probs, "detach"):
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)[:, : len(targets)]
    pooled = probs[0] if len(probs) == 1 else probs.sum(0)  # (H, E) expected uses
    top = np.argsort(-pooled, axis=-1, kind="stable")[:, :per_layer]
    if min_probability > 0:
        best = pooled if len(probs) == 1 else probs.max(0)
        keep = np.take_along_axis(best, top, axis=-1) >= min_probability
        return [(t, e) for t, row, oks in zip(targets, top.tolist(), keep.tolist()) for e, ok in zip(row, oks) if ok]
    return [(t, e) for t, row in zip(targets, top.tolist()) for e in row]


def oracle_requests(
    experts_at: Callable[[int], Iterable[int]], position: int, reach: int, end: int, num_layers: int
) -> list[Request]:
    """What the oracle prefetches once the layer at ``position`` has routed: the recorded
    experts (``experts_at(p)``; negative ids are none) of the next ``reach`` positions in
    decode order, into the next token, up to ``end``."""
    ahead = range(position + 1, min(position + 1 + reach, end))
    return [((p % num_layers, e), p) for p in ahead for e in sorted({int(x) for x in experts_at(p) if x >= 0})]


def in_token_requests(keys: Iterable[Key], step: int, num_layers: int) -> list[Request]:
    """Requests for layers of decode step ``step`` (a plan for the token being decoded, or,
    with ``step + 1``, for the next one)."""
    return [(key, step * num_layers + key[0]) for key in keys]


# --- when a request is stale ---------------------------------------------------------------
class PrefetchQueue:
    """Prefetch requests not yet started, oldest first. A request is dropped unstarted once
    decoding reaches its position without needing it, or passes it: the read would only
    evict something. A plan that arrives late keeps only the positions not yet reached."""

    def __init__(self, log: EventLog | None = None):
        self.entries: deque[Request] = deque()
        self.queued: set[Key] = set()
        self.log = log

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.queued

    def request(self, requests: Iterable[Request], present: Callable[[Key], bool], position: int) -> list[Request]:
        """Queue each request not queued already, not present, and for a position after
        ``position`` (where decoding is); returns those queued."""
        added = []
        for key, target in requests:
            if target > position and key not in self.queued and not present(key):
                self.entries.append((key, target))
                self.queued.add(key)
                added.append((key, target))
                if self.log is not None:
                    self.log.append(("request", key, target))
        return added

    def begin_layer(self, position: int, needed: set[Key]) -> list[Request]:
        """The layer at ``position`` has routed: drop what it does not need, and anything
        older; returns what was dropped."""
        return self._drop(lambda key, target: target < position or (target == position and key not in needed))

    def finish_layer(self, position: int) -> list[Request]:
        return self._drop(lambda key, target: target <= position)

    def pop(self) -> Request | None:
        if not self.entries:
            return None
        key, target = self.entries.popleft()
        self.queued.discard(key)
        return key, target

    def take(self, key: Key) -> bool:
        """Remove a request that has not started, because the decoder will read it itself."""
        if key not in self.queued:
            return False
        self.entries = deque(entry for entry in self.entries if entry[0] != key)
        self.queued.discard(key)
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.queued.clear()

    def _drop(self, stale: Callable[[Key, int], bool]) -> list[Request]:
        kept, dropped = deque(), []
        for key, target in self.entries:
            if stale(key, target):
                self.queued.discard(key)
                dropped.append((key, target))
                if self.log is not None:
                    self.log.append(("drop", key, target))
            else:
                kept.append((key, target))
        self.entries = kept
        return dropped


# --- what the fast tier keeps --------------------------------------------------------------
T = TypeVar("T")


class Residency(Generic[T]):
    """The experts a fast tier holds (each with a payload: a ready time in the simulator,
    tensors in the measured tier) within ``capacity_bytes``.

    The running layer's experts are pinned when they fit together (a layer wider than the
    tier streams through it); a prefetch not yet used is protected while it awaits its
    layer (see :class:`~specmoe.offload.eviction.EvictionPolicy`) and demoted to first
    victim once its layer has run without it; a prefetch evicted unused is waste. A policy
    that keeps nothing (on-demand) drops every unpinned expert when a layer finishes."""

    def __init__(
        self, capacity_bytes: int, eviction: EvictionPolicy, *, keeps_experts: bool = True, log: EventLog | None = None
    ):
        if capacity_bytes < 1:
            raise ValueError(f"the fast tier's capacity must be positive, got {capacity_bytes} bytes")
        self.capacity = capacity_bytes
        self.eviction = eviction
        self.keeps_experts = keeps_experts
        self.log = log
        self.entries: dict[Key, T] = {}
        self.sizes: dict[Key, int] = {}
        self.used = 0
        self.pinned: set[Key] = set()
        self.unused_prefetch: set[Key] = set()
        self.position = 0
        """Where decoding is: the time of eviction policies that count positions (Belady's
        next uses, LRFU's decay); the others count admissions and uses (``clock``)."""
        self.clock = 0
        self.peak = 0
        self.wasted_prefetches = 0
        self.wasted_bytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Key) -> T | None:
        """The payload, without counting a use."""
        return self.entries.get(key)

    def begin_layer(self, position: int, keys: Iterable[Key], nbytes: int) -> None:
        """The layer at ``position`` needs ``keys`` (``nbytes`` together): pin them if they fit."""
        self.position = position
        self.pinned = set(keys) if nbytes <= self.capacity else set()

    def finish_layer(self, layer: int) -> None:
        """``layer`` has run: unpin; its unused prefetches become the first victims."""
        self.pinned = set()
        for key in self.unused_prefetch:
            if key[0] == layer:
                self.eviction.demote(key)
        if not self.keeps_experts:
            for key in list(self.entries):
                self._remove(key)

    def admit(self, key: Key, payload: T, nbytes: int, *, prefetch: bool) -> bool:
        """Hold ``key``, evicting as needed; False (nothing changed) if only pinned experts
        could make room. A demand load is not a use until :meth:`use`."""
        if key in self.entries:
            return True
        while self.used + nbytes > self.capacity:
            candidates = [k for k in self.entries if k not in self.pinned]
            if not candidates:
                return False
            victim = self.eviction.choose(candidates, self._now())
            if victim in self.unused_prefetch:
                self.wasted_prefetches += 1
                self.wasted_bytes += self.sizes[victim]
            self._remove(victim)
            if self.log is not None:
                self.log.append(("evict", victim))
        self.entries[key], self.sizes[key] = payload, nbytes
        self.used += nbytes
        self.clock += 1
        self.eviction.on_insert(key, self._now())
        if prefetch:
            self.unused_prefetch.add(key)
        self.peak = max(self.peak, self.used)
        if self.log is not None:
            self.log.append(("admit", key, prefetch))
        return True

    def use(self, key: Key) -> None:
        self.clock += 1
        self.eviction.on_use(key, self._now())
        self.unused_prefetch.discard(key)

    def restart_counts(self) -> None:
        """Counters start over (after a warm-up); what is held stays."""
        self.peak, self.wasted_prefetches, self.wasted_bytes = self.used, 0, 0

    def unused_bytes(self) -> int:
        """Prefetched bytes still held and never used: waste too, once decoding ends."""
        return sum(self.sizes[k] for k in self.unused_prefetch)

    def _now(self) -> int:
        return self.position if self.eviction.by_position else self.clock

    def _remove(self, key: Key) -> None:
        del self.entries[key]
        self.used -= self.sizes.pop(key)
        self.unused_prefetch.discard(key)
