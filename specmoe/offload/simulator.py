"""Trace-driven simulation of offloaded decoding (a SIMULATION: no weights move).

Recorded routing is replayed in decode order: B sequences advance in lockstep, token by
token, layer by layer; a layer needs the union of its B tokens' experts. One link moves
experts from the slow to the fast tier, one transfer at a time; demand loads go before any
queued prefetch (a transfer already under way finishes first). A layer computes once all
its experts have arrived; the wait is stall time. After layer l computes, a prefetch policy
may queue experts for layers l+1..l+H as soon as layer l's routing is known (when its
experts start computing), so those transfers overlap layer l's compute. The oracle may read
further, ``oracle_lookahead`` layers ahead in decode order and into the next token, as the
measured benchmark's oracle does. For predictors that
read layer l's *output* hidden state this is slightly optimistic (they could only issue
once layer l finishes).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import asdict, dataclass

import numpy as np

from specmoe.offload.cache import EVICTIONS, ExpertCache, Key, eviction_policy, future_uses
from specmoe.offload.cost import HardwareProfile

POLICIES = ("on-demand", "cache", "prefetch", "oracle")
NO_TOKEN = -2
"""Routing value for a batch slot with no token (a sequence that already ended)."""


@dataclass(frozen=True)
class SimulationConfig:
    policy: str = "on-demand"
    """``on-demand``: load what each layer needs, keep nothing (the floor); ``cache``: no
    prefetch, reuse what the eviction policy keeps; ``prefetch``: predictor-driven;
    ``oracle``: prefetch the true future experts (the ceiling)."""
    eviction: str = "lru"
    capacity: int = 1
    """Fast-tier slots, in experts."""
    lookahead: int = 1
    """Prefetch for layers l+1..l+lookahead."""
    budget: int = 1
    """Experts per target layer a prefetch may request."""
    threshold: float = 0.0
    """Minimum predicted probability for a prefetch."""
    oracle_lookahead: int | None = None
    """Layers the oracle reads ahead in decode order, past the token's last layer into the
    next token's (at most L-1); None: ``lookahead`` layers, within the token."""

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")


@dataclass
class SimulationResult:
    """Totals of one simulated run (all times in seconds, simulated)."""

    config: dict
    steps: int
    tokens: int
    total_s: float
    stall_s: float
    accesses: int
    hits: int
    late_prefetches: int
    demand_loads: int
    prefetch_loads: int
    wasted_prefetches: int
    expert_bytes: int
    peak_slots: int

    @property
    def time_per_token_s(self) -> float:
        return self.total_s / max(self.steps, 1)

    def summary(self) -> dict:
        moved = self.demand_loads + self.prefetch_loads
        return {
            **asdict(self),
            "simulated": True,
            "tokens_per_s": self.tokens / self.total_s if self.total_s else 0.0,
            "time_per_token_s": self.time_per_token_s,
            "stall_fraction": self.stall_s / max(self.total_s, 1e-12),
            "hit_rate": self.hits / max(self.accesses, 1),
            "bytes_moved": moved * self.expert_bytes,
            "wasted_prefetch_bytes": self.wasted_prefetches * self.expert_bytes,
            "peak_fast_tier_bytes": self.peak_slots * self.expert_bytes,
        }


def _uses(routing: np.ndarray) -> dict[Key, list[int]]:
    steps, batch, layers, k = routing.shape
    per_layer = routing.transpose(0, 2, 1, 3).reshape(steps, layers, batch * k)  # a batch's union per layer
    return future_uses(per_layer, layers)


def simulate(
    routing: np.ndarray,
    profile: HardwareProfile,
    expert_bytes: int,
    config: SimulationConfig,
    predictions: tuple[np.ndarray, np.ndarray] | None = None,
) -> SimulationResult:
    """Replay ``routing`` (S steps, B sequences, L layers, k); -1 is a dropped token, NO_TOKEN
    an empty slot.

    ``predictions`` = (ids, probs), both (S, B, L, H, m): after layer l of step s, the
    predictor's top-m experts for layers l+1..l+H of each sequence. Ignored unless
    ``config.policy == "prefetch"``.
    """
    steps, _, layers, _ = routing.shape
    reach = None if config.oracle_lookahead is None else oracle_reach(layers, config.oracle_lookahead)
    uses = _uses(routing)
    cache = ExpertCache(config.capacity, eviction_policy(config.eviction, layers, uses))
    transfer = profile.transfer_s(expert_bytes)
    now = link_free = stall = 0.0
    pending: deque[tuple[Key, int, float]] = deque()  # (expert, position it is for, time requested)
    queued: set[Key] = set()
    hits = late = demand = prefetched = accesses = 0
    tokens = int((routing[:, :, 0, 0] != NO_TOKEN).sum())

    def start_prefetches(until: float, position: int) -> None:
        nonlocal link_free, prefetched
        while pending and max(link_free, pending[0][2]) < until:
            key, target, requested = pending.popleft()
            queued.discard(key)
            if target < position or key in cache:  # stale or already there
                continue
            begin = max(link_free, requested)
            if cache.admit(key, begin + transfer, position, prefetch=True):
                link_free = begin + transfer
                prefetched += 1

    for s in range(steps):
        for layer in range(layers):
            position = s * layers + layer
            need = {(layer, int(e)) for e in np.unique(routing[s, :, layer]) if e >= 0}
            if config.policy == "on-demand":
                cache.ready_at.clear()
            # A layer wider than the fast tier streams its experts through it one by one.
            cache.pinned = need if len(need) <= cache.capacity else set()
            start_prefetches(now, position)
            ready = now
            for key in sorted(need):
                accesses += 1
                if key in cache:
                    if cache.ready_at[key] <= now:
                        hits += 1
                    else:
                        late += 1
                else:
                    begin = max(now, link_free)
                    link_free = begin + transfer
                    cache.admit(key, link_free, position, prefetch=False)  # never refused: see pinned above
                    demand += 1
                ready = max(ready, cache.ready_at[key])
                cache.use(key, position)
            stall += ready - now
            # Layer l's routing is known when its experts start computing: prefetches for
            # l+1..l+H are queued then, so their transfers overlap this layer's compute.
            wanted: list[tuple[int, int]] = []  # (decode position it is for, expert)
            if config.policy == "oracle" and reach is not None:  # into the next token too
                ahead = range(position + 1, min(position + 1 + reach, steps * layers))
                wanted = [(p, int(e)) for p in ahead for e in np.unique(routing[p // layers, :, p % layers]) if e >= 0]
            elif config.policy in ("prefetch", "oracle"):
                horizons = range(1, min(config.lookahead, layers - 1 - layer) + 1)
                wanted = [
                    (position + h, e)
                    for h in horizons
                    for e in _prefetch_set(routing, predictions, config, s, layer, h)
                ]
            for target, expert in wanted:
                key = (target % layers, expert)
                if key not in cache and key not in queued:
                    pending.append((key, target, ready))
                    queued.add(key)
            now = ready + profile.compute_s_per_layer
            cache.pinned = set()
            cache.expire(layer)
    start_prefetches(now, steps * layers)
    return SimulationResult(
        config=asdict(config),
        steps=steps,
        tokens=tokens,
        total_s=now,
        stall_s=stall,
        accesses=accesses,
        hits=hits,
        late_prefetches=late,
        demand_loads=demand,
        prefetch_loads=prefetched,
        wasted_prefetches=cache.wasted_prefetches + len(cache.unused_prefetch),
        expert_bytes=expert_bytes,
        peak_slots=cache.peak,
    )


def _prefetch_set(routing, predictions, config: SimulationConfig, step: int, layer: int, h: int) -> list[int]:
    """Experts to prefetch for layer+h: the true ones (oracle) or the predictor's, pooled over
    the batch by summed probability, at most ``budget``, each above ``threshold``."""
    if config.policy == "oracle":
        true = routing[step, :, layer + h]
        return [int(e) for e in np.unique(true) if e >= 0]
    ids, probs = predictions[0][step, :, layer, h - 1], predictions[1][step, :, layer, h - 1]  # (B, m)
    scores: dict[int, float] = defaultdict(float)
    best: dict[int, float] = defaultdict(float)
    for e, p in zip(ids.reshape(-1), probs.reshape(-1)):
        scores[int(e)] += float(p)
        best[int(e)] = max(best[int(e)], float(p))
    ranked = sorted((e for e in scores if best[e] >= config.threshold), key=lambda e: -scores[e])
    return ranked[: config.budget]


def oracle_reach(layers: int, requested: int, option: str = "oracle_lookahead") -> int:
    """The layers the oracle may read ahead in decode order: ``requested``, which must be in
    [1, L-1]; with a single MoE layer there is no such reach, and it reads none."""
    if not 1 <= requested <= max(layers - 1, 1):
        raise ValueError(f"{option} must be in [1, {max(layers - 1, 1)}] for {layers} MoE layers, got {requested}")
    return min(requested, layers - 1)
