"""The state every engine keeps the same way: the requests waiting for the link
(:class:`PrefetchQueue`: in deadline order, and when a request is stale) and what the fast
tier holds (:class:`Residency`). Part of the policy core (:mod:`specmoe.offload.policy`)."""

from __future__ import annotations

from bisect import insort
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from specmoe.offload import Key
from specmoe.offload.eviction import EvictionPolicy
from specmoe.offload.forecast import Outlook

Request = tuple[Key, int]
"""A prefetch request: the expert, and the decode position whose layer needs it."""
EventLog = list[tuple]
"""Decisions in the order made (``("admit", key, prefetch)``, ``("evict", key)``,
``("request", key, position)``, ``("drop", key, position)``, ``("hit" | "late" | "miss",
key)``): what the parity tests compare between the simulator and the measured engines."""


# --- when a request is stale ---------------------------------------------------------------
class PrefetchQueue:
    """Prefetch requests not yet started, in deadline order (the position that needs them;
    in the order requested among equals), each with the probability it is needed. A request
    is dropped unstarted once decoding reaches its position without needing it, or passes
    it: the read would only evict something. A plan that arrives late keeps only the
    positions not yet reached."""

    def __init__(self, log: EventLog | None = None):
        self.entries: list[Request] = []
        self.queued: set[Key] = set()
        self.probability: dict[Key, float] = {}
        self.log = log

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Key) -> bool:
        return key in self.queued

    def request(
        self,
        requests: Iterable[Request],
        present: Callable[[Key], bool],
        position: int,
        probabilities: dict[Key, float] | None = None,
    ) -> list[Request]:
        """Queue each request not queued already, not present, and for a position after
        ``position`` (where decoding is); returns those queued."""
        added = []
        for key, target in requests:
            if target > position and key not in self.queued and not present(key):
                insort(self.entries, (key, target), key=lambda entry: entry[1])
                self.queued.add(key)
                self.probability[key] = 1.0 if probabilities is None else probabilities[key]
                added.append((key, target))
                if self.log is not None:
                    self.log.append(("request", key, target))
        return added

    def begin_layer(self, position: int, needed: set[Key]) -> list[Request]:
        """The layer at ``position`` has routed: drop what it does not need, and anything
        older; returns what was dropped."""
        return self.drop(lambda key, target: target < position or (target == position and key not in needed))

    def finish_layer(self, position: int) -> list[Request]:
        return self.drop(lambda key, target: target <= position)

    def peek(self) -> Request | None:
        return self.entries[0] if self.entries else None

    def pop(self) -> Request | None:
        if not self.entries:
            return None
        key, target = self.entries.pop(0)
        self.queued.discard(key)
        self.probability.pop(key, None)
        return key, target

    def take(self, key: Key) -> bool:
        """Remove a request that has not started, because the decoder will read it itself."""
        if key not in self.queued:
            return False
        self.entries = [entry for entry in self.entries if entry[0] != key]
        self.queued.discard(key)
        self.probability.pop(key, None)
        return True

    def clear(self) -> None:
        self.entries.clear()
        self.queued.clear()
        self.probability.clear()

    def drop(self, stale: Callable[[Key, int], bool]) -> list[Request]:
        """Drop every request ``stale(key, target)`` says is; returns them."""
        kept, dropped = [], []
        for key, target in self.entries:
            if stale(key, target):
                self.queued.discard(key)
                self.probability.pop(key, None)
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
    that keeps nothing (on-demand) drops every unpinned expert when a layer finishes.

    Every use feeds the eviction policy's :class:`~specmoe.offload.forecast.Outlook` (the
    next-use estimate), and demand reads per layer are averaged (``demand_per_layer``): both
    count decisions, not time, so every engine keeps them alike."""

    def __init__(
        self, capacity_bytes: int, eviction: EvictionPolicy, *, keeps_experts: bool = True, log: EventLog | None = None
    ):
        if capacity_bytes < 1:
            raise ValueError(f"the fast tier's capacity must be positive, got {capacity_bytes} bytes")
        self.capacity = capacity_bytes
        self.eviction = eviction
        self.outlook: Outlook | None = eviction.outlook
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
        self.demand_per_layer = 0.0
        """Demand reads per layer, a moving average over the last few dozen layers."""
        self._demands = 0

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
        self.demand_per_layer += 0.05 * (self._demands - self.demand_per_layer)
        self._demands = 0

    def begin_token(self, step: int, token_ids, sequences, earlier=None) -> None:
        """Step ``step`` decodes ``token_ids`` of ``sequences`` (one per batch slot; ``earlier``:
        a prompt's tokens before them): what the outlook's recurrence, where it has one,
        matches the sequences' past by (:meth:`Recurrence.begin_token`)."""
        if self.outlook is not None and self.outlook.recurrence is not None:
            self.outlook.recurrence.begin_token(step, token_ids, sequences, earlier)

    def end_token(self, routing, earlier=None) -> None:
        """The step has run; ``routing`` (B, L, k): each slot's experts."""
        if self.outlook is not None and self.outlook.recurrence is not None:
            self.outlook.recurrence.end_token(routing, earlier)

    def admit(self, key: Key, payload: T, nbytes: int, *, prefetch: bool) -> bool:
        """Hold ``key``, evicting as needed; False (nothing changed) if only pinned experts
        could make room. A demand load is not a use until :meth:`use`."""
        if key in self.entries:
            return True
        while self.used + nbytes > self.capacity:
            candidates = [k for k in self.entries if k not in self.pinned]
            if not candidates:
                return False
            victim = self.eviction.choose(candidates, self._now(), key)
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
        else:
            self._demands += 1
        self.peak = max(self.peak, self.used)
        if self.log is not None:
            self.log.append(("admit", key, prefetch))
        return True

    def use(self, key: Key) -> None:
        self.clock += 1
        self.eviction.on_use(key, self._now())
        if self.outlook is not None:
            self.outlook.on_use(key, self.position)
        self.unused_prefetch.discard(key)

    def victims(self, count: int) -> list[Key]:
        """The next ``count`` experts eviction would give up, in order, if nothing changed."""
        candidates = [k for k in self.entries if k not in self.pinned]
        return self.eviction.ranking(candidates, self._now(), count) if count > 0 else []

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
