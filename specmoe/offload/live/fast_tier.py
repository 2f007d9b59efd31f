"""The measured fast tier: expert tensors held under the policy core's
:class:`~specmoe.offload.policy.Residency`, shared by the decoding thread and the prefetch
thread, and the counters of a measured run.

Stall time is host time spent waiting for an expert: a demand read, or a prefetch still in
flight (on a GPU, its copy event is waited on so the stall is seen, not hidden in the stream).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from specmoe.offload import Key
from specmoe.offload.eviction import eviction_policy
from specmoe.offload.live.tiers import Loaded
from specmoe.offload.policy import EventLog, Residency


@dataclass
class RuntimeStats:
    hits: int = 0
    misses: int = 0
    late: int = 0
    """Needed while its prefetch was still reading or copying."""
    demand_reads: int = 0
    prefetch_reads: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    peak_bytes: int = 0
    prefetch_requests: int = 0
    prefetch_pauses: int = 0
    """Times a prefetch read held back, between two chunks, for a demand read."""
    plan_s: float = 0.0
    plan_cpu_s: float = 0.0
    """Wall and CPU time of planning on the prefetch thread (off the decoding path)."""
    predict_s: float = 0.0
    predict_cpu_s: float = 0.0
    """Wall and CPU time the decoding thread spent on prediction: handing plans over (or,
    planning inline, planning), and guessing the next token."""
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
    """Expert tensors in fast memory, never more than ``budget_bytes``, kept and evicted by
    the policy core. Thread-safe: ``lock`` also guards the prefetch queue (see
    :class:`~specmoe.offload.live.prefetcher.Prefetcher`), so a layer's start or end changes
    both at once."""

    def __init__(
        self,
        budget_bytes: int,
        stats: RuntimeStats,
        eviction: str = "lru",
        future_uses: dict[Key, list[int]] | None = None,
        num_layers: int = 1,
        *,
        keeps_experts: bool = True,
        log: EventLog | None = None,
    ):
        self.residency: Residency[Loaded] = Residency(
            budget_bytes, eviction_policy(eviction, num_layers, future_uses), keeps_experts=keeps_experts, log=log
        )
        self.budget = budget_bytes
        self.stats = stats
        self.lock = threading.RLock()

    @property
    def policy(self):
        return self.residency.eviction

    def __contains__(self, key: Key) -> bool:
        """Presence without counting a use (for the prefetcher's checks)."""
        with self.lock:
            return key in self.residency

    def get(self, key: Key) -> Loaded | None:
        """The expert's tensors, counting a use; None if not held."""
        with self.lock:
            loaded = self.residency.get(key)
            if loaded is not None:
                self.residency.use(key)
            return loaded

    def put(self, key: Key, loaded: Loaded, nbytes: int, *, prefetch: bool) -> bool:
        """Hold ``key``; a demand load (``prefetch=False``) counts as a use. False if only
        pinned experts could make room."""
        with self.lock:
            if not self.residency.admit(key, loaded, nbytes, prefetch=prefetch):
                return False
            if not prefetch:
                self.residency.use(key)
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.residency.used)
            return True

    def restart_counts(self) -> None:
        with self.lock:
            self.residency.restart_counts()
            self.stats.peak_bytes = self.residency.used
