"""Eviction policies: which resident expert a full fast tier gives up. Shared by the
simulated cache and the measured fast tier through :class:`specmoe.offload.policy.Residency`."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import defaultdict

from specmoe.offload import Key

EVICTIONS = ("lru", "lfu", "lrfu", "belady")
LRFU_HALF_LIFE_TOKENS = 16
"""Picked from 8, 16, 32 and 64 on the validation split of olmoe-64e decoding traces
(docs/benchmarks.md, "Where the gap to the oracle is")."""


class EvictionPolicy:
    """Ranks residents for eviction. A prefetched expert is ``on_insert``-ed: not yet used
    (LFU does not count it), but it waits for its layer and is not evicted while anything
    else can go (:meth:`choose`): otherwise a frequency policy would evict each fresh
    prefetch, at count zero, for the next. If its layer runs without it, it is ``demote``-d
    to first victim, since the prediction it came from has expired."""

    name = ""
    by_position = False
    """Times are decode positions (step * layers + layer), not a count of cache events."""
    protects_prefetches = True

    def __init__(self):
        self.awaiting: set[Key] = set()
        """Prefetched, and its layer has not run since."""
        self.last: dict[Key, int] = {}
        """When each key was last inserted or used (-1: demoted); what ties break by."""

    def on_insert(self, key: Key, position: int) -> None:
        self.awaiting.add(key)
        self.last[key] = position

    def on_use(self, key: Key, position: int) -> None:
        self.awaiting.discard(key)
        self.last[key] = position

    def demote(self, key: Key) -> None:
        self.awaiting.discard(key)
        self.last[key] = -1

    def victim(self, candidates: list[Key], position: int) -> Key:
        raise NotImplementedError

    def choose(self, candidates: list[Key], position: int) -> Key:
        """The resident to evict: the policy's victim among those not awaiting their layer,
        or, if every candidate is, among them."""
        if self.protects_prefetches:
            candidates = [k for k in candidates if k not in self.awaiting] or candidates
        return self.victim(candidates, position)


class LRU(EvictionPolicy):
    name = "lru"

    def victim(self, candidates, position):
        return min(candidates, key=lambda k: self.last.get(k, -1))


class LFU(EvictionPolicy):
    """Least frequently used so far; ties broken by least recently used."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.count: dict[Key, int] = defaultdict(int)

    def on_use(self, key, position):
        super().on_use(key, position)
        self.count[key] += 1

    def demote(self, key):
        super().demote(key)
        self.count[key] = 0

    def victim(self, candidates, position):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, -1)))


class LRFU(EvictionPolicy):
    """Least recently/frequently used (Lee et al., 1999): each use adds 1 to a score that
    halves every ``half_life`` positions; the lowest score goes first, ties (unused
    prefetches, at zero) to the least recent. Between LFU, whose counts never forget, and
    LRU, which only remembers the last use: decoding's expert usage drifts with the text.

    The score is kept as its logarithm at a common time origin, ``log2(score) + t /
    half_life``, so comparing two keys needs no decaying."""

    name = "lrfu"
    by_position = True

    def __init__(self, half_life: float):
        if half_life <= 0:
            raise ValueError(f"the LRFU half-life must be positive, got {half_life}")
        super().__init__()
        self.half_life = half_life
        self.log_score: dict[Key, float] = {}

    def on_insert(self, key, position):
        super().on_insert(key, position)
        self.log_score.setdefault(key, -math.inf)

    def on_use(self, key, position):
        super().on_use(key, position)
        now = position / self.half_life
        decayed = 2.0 ** (self.log_score.get(key, -math.inf) - now)  # the score now
        self.log_score[key] = math.log2(decayed + 1.0) + now

    def demote(self, key):
        super().demote(key)
        self.log_score[key] = -math.inf

    def victim(self, candidates, position):
        return min(candidates, key=lambda k: (self.log_score.get(k, -math.inf), self.last.get(k, -1)))


class Belady(EvictionPolicy):
    """Offline optimum: evict the expert whose next use is farthest away (needs the future)."""

    name = "belady"
    by_position = True
    protects_prefetches = False  # it knows which prefetches are needed, and when

    def __init__(self, uses: dict[Key, list[int]]):
        super().__init__()
        self.uses = uses  # key -> sorted positions at which it is needed

    def next_use(self, key: Key, position: int) -> float:
        times = self.uses.get(key, [])
        i = bisect_right(times, position)
        return times[i] if i < len(times) else float("inf")

    def victim(self, candidates, position):
        return max(candidates, key=lambda k: self.next_use(k, position))


def eviction_policy(name: str, num_layers: int, future: dict[Key, list[int]] | None = None) -> EvictionPolicy:
    """The policy called ``name`` for a stack of ``num_layers`` layers; Belady needs
    ``future`` (from :func:`future_uses`)."""
    if name not in EVICTIONS:
        raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {name!r}")
    if name == "belady":
        if future is None:
            raise ValueError("Belady eviction needs the future: pass future_uses")
        return Belady(future)
    if name == "lrfu":
        return LRFU(LRFU_HALF_LIFE_TOKENS * num_layers)
    return {"lru": LRU, "lfu": LFU}[name]()


def future_uses(routing, num_layers: int) -> dict[Key, list[int]]:
    """Positions (step * layers + layer) at which each expert is needed, from recorded routing
    ``routing[step][layer] -> experts`` (negative ids: no expert); what Belady evicts by."""
    uses: dict[Key, list[int]] = {}
    for step, layers in enumerate(routing):
        for layer, experts in enumerate(layers):
            for e in sorted({int(x) for x in experts if x >= 0}):
                uses.setdefault((layer, e), []).append(step * num_layers + layer)
    return uses
