"""The measured fast tier shared by the runtime and the replay benchmark: a byte-budgeted
expert cache, and the demand path that falls back to the slow tier (with the background
:class:`~specmoe.offload.prefetcher.Prefetcher`, when there is one).

Stall time is host time spent waiting for an expert: a demand read, or a prefetch still in
flight (on a GPU, its copy event is waited on so the stall is seen, not hidden in the stream).
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from specmoe.offload.cache import eviction_policy, expire_prefetches
from specmoe.offload.tiers import Key, Loaded, Transfer

if TYPE_CHECKING:
    from specmoe.offload.prefetcher import Prefetcher


@dataclass
class RuntimeStats:
    hits: int = 0
    misses: int = 0
    late: int = 0
    """Needed while its prefetch was still reading or copying."""
    demand_reads: int = 0
    prefetch_reads: int = 0
    wasted_prefetches: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    peak_bytes: int = 0
    prefetch_requests: int = 0
    prefetch_pauses: int = 0
    """Times a prefetch read held back, between two chunks, for a demand read."""
    plan_s: float = 0.0
    plan_cpu_s: float = 0.0
    """Wall and CPU time of planning on the prefetch thread (off the decoding path)."""
    stall_s_by_layer: dict[int, float] = field(default_factory=dict)
    """Where the stall was: which layers' experts came late."""

    def stalled(self, layer: int, since: float) -> None:
        waited = time.perf_counter() - since
        self.stall_s += waited
        self.stall_s_by_layer[layer] = self.stall_s_by_layer.get(layer, 0.0) + waited

    def to_dict(self) -> dict:
        accesses = self.hits + self.misses + self.late
        by_layer = self.stall_s_by_layer
        return {
            **self.__dict__,
            "stall_s_by_layer": [by_layer.get(layer, 0.0) for layer in range(max(by_layer, default=-1) + 1)],
            "hit_rate": self.hits / max(accesses, 1),
        }


class FastTier:
    """Expert tensors in fast memory, never more than ``budget_bytes``; experts pinned by the
    running layer are never evicted. Thread-safe."""

    def __init__(
        self,
        budget_bytes: int,
        stats: RuntimeStats,
        eviction: str = "lru",
        future_uses: dict[Key, list[int]] | None = None,
        num_layers: int = 1,
    ):
        self.policy = eviction_policy(eviction, num_layers, future_uses)
        self.budget = budget_bytes
        self.stats = stats
        self.entries: dict[Key, tuple[Loaded, int]] = {}
        self.used = 0
        self.pinned: set[Key] = set()
        self.unused_prefetch: set[Key] = set()
        self.position = 0
        """Where decoding is (step * layers + layer): the time of policies that measure in
        positions (Belady's next uses, LRFU's decay); the others count cache events."""
        self.clock = 0
        self.lock = threading.RLock()

    def get(self, key: Key) -> Loaded | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.clock += 1
                self.policy.on_use(key, self._now())
                self.unused_prefetch.discard(key)
            return None if entry is None else entry[0]

    def _now(self) -> int:
        return self.position if self.policy.by_position else self.clock

    def __contains__(self, key: Key) -> bool:
        """Presence without counting a use (for the prefetcher's checks)."""
        with self.lock:
            return key in self.entries

    def clear(self) -> None:
        """Drop everything not pinned (the on-demand floor keeps nothing between layers)."""
        with self.lock:
            for key in [k for k in self.entries if k not in self.pinned]:
                self.used -= self.entries.pop(key)[1]

    def expire(self, layer: int) -> None:
        """``layer`` has run: its unused prefetches go first when room is needed."""
        with self.lock:
            expire_prefetches(self.policy, self.unused_prefetch, layer)

    def put(self, key: Key, loaded: Loaded, nbytes: int, *, prefetch: bool) -> bool:
        with self.lock:
            if key in self.entries:
                return True
            while self.used + nbytes > self.budget:
                candidates = [k for k in self.entries if k not in self.pinned]
                if not candidates:
                    return False
                victim = self.policy.choose(candidates, self._now())
                self.used -= self.entries.pop(victim)[1]
                if victim in self.unused_prefetch:
                    self.unused_prefetch.discard(victim)
                    self.stats.wasted_prefetches += 1
            self.entries[key] = (loaded, nbytes)
            self.used += nbytes
            self.clock += 1
            if prefetch:
                self.policy.on_insert(key, self._now())
                self.unused_prefetch.add(key)
            else:
                self.policy.on_use(key, self._now())
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            return True


def finish_layer(tier: FastTier, prefetcher: Prefetcher | None, layer: int) -> None:
    """``layer`` has computed: unpin its experts; its unused prefetches become the first
    victims and its prefetches not yet started are dropped."""
    with tier.lock:
        tier.pinned = set()
        tier.expire(layer)
    if prefetcher is not None:
        prefetcher.drop_stale(layer)


def fetch_expert(
    tier: FastTier, prefetcher: Prefetcher | None, transfer: Transfer, stats: RuntimeStats, key: Key
) -> list:
    """One expert's tensors, ready for the current stream: from the fast tier (hit), from a
    prefetch still loading (late), or loaded now from the slow tier (miss)."""
    began = time.perf_counter()
    loaded = tier.get(key)
    if loaded is None and prefetcher is not None and prefetcher.wait_for(key):
        loaded = tier.get(key)
        if loaded is not None:
            stats.late += 1
            loaded.wait_host()
            stats.stalled(key[0], began)
            return loaded.for_compute()
    if loaded is not None:
        if loaded.in_flight():  # a GPU copy queued by the prefetcher has not landed yet
            stats.late += 1
            loaded.wait_host()
            stats.stalled(key[0], began)
        else:
            stats.hits += 1
        return loaded.for_compute()
    nbytes = transfer.expert_nbytes(key[0])
    with prefetcher.demand_read() if prefetcher is not None else nullcontext():
        loaded = transfer.load(key, demand=True)
        loaded.wait_host()
    stats.stalled(key[0], began)
    stats.misses += 1
    stats.demand_reads += 1
    stats.bytes_read += nbytes
    tier.put(key, loaded, nbytes, prefetch=False)
    return loaded.for_compute()
