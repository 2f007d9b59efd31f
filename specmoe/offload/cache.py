"""The fast tier: a fixed number of expert slots with a pluggable eviction policy."""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict

Key = tuple[int, int]  # (layer_idx, expert_idx)


class EvictionPolicy:
    """Ranks residents for eviction. A prefetched expert is ``on_insert``-ed: recent, so it
    survives until its layer runs, but not yet used (LFU does not count it); if that layer
    runs without it, it is ``demote``-d to first victim, since the prediction it came from
    has expired."""

    name = ""

    def on_insert(self, key: Key, position: int) -> None:
        pass

    def on_use(self, key: Key, position: int) -> None:
        pass

    def demote(self, key: Key) -> None:
        pass

    def victim(self, candidates: list[Key], position: int) -> Key:
        raise NotImplementedError


class LRU(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self.last: dict[Key, int] = {}

    def on_insert(self, key, position):
        self.last[key] = position

    def on_use(self, key, position):
        self.last[key] = position

    def demote(self, key):
        self.last[key] = -1

    def victim(self, candidates, position):
        return min(candidates, key=lambda k: self.last.get(k, -1))


class LFU(EvictionPolicy):
    """Least frequently used so far; ties broken by least recently used."""

    name = "lfu"

    def __init__(self):
        self.count: dict[Key, int] = defaultdict(int)
        self.last: dict[Key, int] = {}

    def on_insert(self, key, position):
        self.last[key] = position

    def on_use(self, key, position):
        self.count[key] += 1
        self.last[key] = position

    def demote(self, key):
        self.count[key], self.last[key] = 0, -1

    def victim(self, candidates, position):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))


class Belady(EvictionPolicy):
    """Offline optimum: evict the expert whose next use is farthest away (needs the future)."""

    name = "belady"

    def __init__(self, uses: dict[Key, list[int]]):
        self.uses = uses  # key -> sorted positions at which it is needed

    def next_use(self, key: Key, position: int) -> float:
        times = self.uses.get(key, [])
        i = bisect_right(times, position)
        return times[i] if i < len(times) else float("inf")

    def victim(self, candidates, position):
        return max(candidates, key=lambda k: self.next_use(k, position))


def future_uses(routing, num_layers: int) -> dict[Key, list[int]]:
    """Positions (step * layers + layer) at which each expert is needed, from recorded routing
    ``routing[step][layer] -> experts`` (negative ids: no expert); what Belady evicts by."""
    uses: dict[Key, list[int]] = {}
    for step, layers in enumerate(routing):
        for layer, experts in enumerate(layers):
            for e in sorted({int(x) for x in experts if x >= 0}):
                uses.setdefault((layer, e), []).append(step * num_layers + layer)
    return uses


class ExpertCache:
    """Slots for ``capacity`` experts. Entries carry the time their transfer completes, so an
    expert can be present but still in flight. Pinned entries (needed by the layer running
    now) are never evicted."""

    def __init__(self, capacity: int, policy: EvictionPolicy):
        if capacity < 1:
            raise ValueError(f"the fast tier must hold at least one expert, got capacity {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.ready_at: dict[Key, float] = {}
        self.unused_prefetch: set[Key] = set()
        self.pinned: set[Key] = set()
        self.wasted_prefetches = 0
        self.peak = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.ready_at

    def __len__(self) -> int:
        return len(self.ready_at)

    def admit(self, key: Key, ready_at: float, position: int, *, prefetch: bool) -> bool:
        """Reserve a slot for ``key``, evicting if full; False if every resident is pinned."""
        if len(self.ready_at) >= self.capacity:
            candidates = [k for k in self.ready_at if k not in self.pinned]
            if not candidates:
                return False
            victim = self.policy.victim(candidates, position)
            del self.ready_at[victim]
            if victim in self.unused_prefetch:
                self.unused_prefetch.discard(victim)
                self.wasted_prefetches += 1
        self.ready_at[key] = ready_at
        self.policy.on_insert(key, position)
        if prefetch:
            self.unused_prefetch.add(key)
        self.peak = max(self.peak, len(self.ready_at))
        return True

    def use(self, key: Key, position: int) -> None:
        self.unused_prefetch.discard(key)
        self.policy.on_use(key, position)

    def expire(self, layer: int) -> None:
        """``layer`` has run: its unused prefetches go first when room is needed."""
        expire_prefetches(self.policy, self.unused_prefetch, layer)


def expire_prefetches(policy: EvictionPolicy, unused_prefetch: set[Key], layer: int) -> None:
    for key in unused_prefetch:
        if key[0] == layer:
            policy.demote(key)
