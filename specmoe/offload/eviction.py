"""Eviction policies: which resident expert a full fast tier gives up. Shared by the
simulated cache and the measured fast tier through :class:`specmoe.offload.policy.Residency`."""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import defaultdict

import numpy as np

from specmoe.offload import Key
from specmoe.offload.forecast import LRFU_HALF_LIFE_TOKENS, Outlook

EVICTIONS = ("lru", "lfu", "lrfu", "belady", "next-use", "lru-per-layer")


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
        self.outlook: Outlook | None = None
        """What is known of each expert's next use (set by :func:`eviction_policy`): what
        prediction-aware eviction ranks by, and what the value rule prices an eviction at."""

    def on_insert(self, key: Key, position: int) -> None:
        self.awaiting.add(key)
        self.last[key] = position

    def on_use(self, key: Key, position: int) -> None:
        self.awaiting.discard(key)
        self.last[key] = position

    def demote(self, key: Key) -> None:
        self.awaiting.discard(key)
        self.last[key] = -1

    def order(self, key: Key, position: int):
        """Sort key: the lowest goes first."""
        raise NotImplementedError

    def victim(self, candidates: list[Key], position: int, incoming: Key | None = None) -> Key:
        return min(candidates, key=lambda k: self.order(k, position))

    def _eligible(self, candidates: list[Key]) -> list[Key]:
        if self.protects_prefetches:
            return [k for k in candidates if k not in self.awaiting] or candidates
        return candidates

    def choose(self, candidates: list[Key], position: int, incoming: Key | None = None) -> Key:
        """The resident to evict for ``incoming``: the policy's victim among those not
        awaiting their layer, or, if every candidate is, among them."""
        return self.victim(self._eligible(candidates), position, incoming)

    def ranking(self, candidates: list[Key], position: int, count: int) -> list[Key]:
        """The next ``count`` victims, in order, if nothing changed in between (what the value
        rule prices evictions by)."""
        return heapq.nsmallest(count, self._eligible(candidates), key=lambda k: self.order(k, position))


class LRU(EvictionPolicy):
    name = "lru"

    def order(self, key, position):
        return self.last.get(key, -1)


class PerLayerLRU(LRU):
    """Least recently used of the incoming expert's own layer, while that layer holds one
    that may go (as mixtral-offloading keeps an LRU cache per layer); else of all layers.
    Once the fast tier has filled, each layer keeps about the share it filled."""

    name = "lru-per-layer"

    def victim(self, candidates, position, incoming=None):
        if incoming is not None:
            own = [k for k in candidates if k[0] == incoming[0]]
            candidates = own or candidates
        return super().victim(candidates, position)


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

    def order(self, key, position):
        return self.count.get(key, 0), self.last.get(key, -1)


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

    def order(self, key, position):
        return self.log_score.get(key, -math.inf), self.last.get(key, -1)


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

    def order(self, key, position):
        return -self.next_use(key, position)


class NextUse(EvictionPolicy):
    """Prediction-aware: evicts the expert whose next use is expected farthest away
    (:meth:`Outlook.expected_waits`: the predictors' chance of use at its next opportunity,
    within this token or, from a next-token guess, the next; else its LRFU use rate), ties
    to the least recent; a prefetch whose layer ran without it goes first. Belady evicts by
    the recorded next use; this by its forecast."""

    name = "next-use"
    by_position = True

    def order(self, key, position):
        last = self.last.get(key, -1)
        return last != -1, -self.outlook.expected_wait(key, position), last

    def _sorted(self, candidates: list[Key], position: int) -> np.ndarray:
        """Candidate indices, first victim first (all at once: a full fast tier asks at
        every admission, over every resident)."""
        last = np.array([self.last.get(k, -1) for k in candidates])
        return np.lexsort((last, -self.outlook.expected_waits(candidates, position), last != -1))

    def victim(self, candidates, position, incoming=None):
        return candidates[int(self._sorted(candidates, position)[0])]

    def ranking(self, candidates, position, count):
        eligible = self._eligible(candidates)
        return [eligible[int(i)] for i in self._sorted(eligible, position)[:count]] if eligible else []


def eviction_policy(name: str, num_layers: int, future: dict[Key, list[int]] | None = None) -> EvictionPolicy:
    """The policy called ``name`` for a stack of ``num_layers`` layers, with an
    :class:`Outlook` of its own; Belady needs ``future`` (from :func:`future_uses`)."""
    if name not in EVICTIONS:
        raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {name!r}")
    if name == "belady":
        if future is None:
            raise ValueError("Belady eviction needs the future: pass future_uses")
        policy = Belady(future)
    elif name == "lrfu":
        policy = LRFU(LRFU_HALF_LIFE_TOKENS * num_layers)
    else:
        policy = {"lru": LRU, "lfu": LFU, "next-use": NextUse, "lru-per-layer": PerLayerLRU}[name]()
    policy.outlook = Outlook(num_layers)
    return policy


def future_uses(routing, num_layers: int) -> dict[Key, list[int]]:
    """Positions (step * layers + layer) at which each expert is needed, from recorded routing
    ``routing[step][layer] -> experts`` (negative ids: no expert); what Belady evicts by."""
    uses: dict[Key, list[int]] = {}
    for step, layers in enumerate(routing):
        for layer, experts in enumerate(layers):
            for e in sorted({int(x) for x in experts if x >= 0}):
                uses.setdefault((layer, e), []).append(step * num_layers + layer)
    return uses
