"""Trace-driven simulation of offloaded decoding (a SIMULATION: no weights move).

The policy core (:mod:`specmoe.offload.policy`) under a cost model's clock. Recorded
routing is replayed in decode order: B sequences advance in lockstep, token by token, layer
by layer; a layer needs the union of its B tokens' experts. One link moves experts from the
slow to the fast tier, one transfer at a time; a demand load goes before any queued
prefetch, but a transfer under way finishes first. A layer computes once all its experts
have arrived; the wait is stall time.

Each layer takes the steps the measured engines take, in the same order
(:mod:`specmoe.offload.live.session`): it routes (its experts are pinned; queued requests
it does not need are dropped), plans made at the routing are requested, its experts are
loaded, it computes, plans that read its output are requested, it finishes. A prefetch
takes its slot when its transfer starts, as soon as the link is free; transfers that start
while a layer computes see that layer's experts pinned.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from specmoe.offload import Key
from specmoe.offload.eviction import eviction_policy, future_uses
from specmoe.offload.forecast import Forecast, LinkModel, Row
from specmoe.offload.policy import (
    EventLog,
    Policy,
    PrefetchQueue,
    PrefetchSettings,
    Request,
    Residency,
    oracle_requests,
    plan_rows,
    policy_named,
    take_forecast,
)
from specmoe.offload.recurrence import Recurrence
from specmoe.offload.settings import TierSize
from specmoe.offload.simulated.cost import HardwareProfile

NO_TOKEN = -2
"""Routing value for a batch slot with no token (a sequence that already ended)."""


@dataclass(frozen=True)
class SimulationConfig:
    policy: str = "on-demand"
    """A policy of :data:`~specmoe.offload.policy.POLICIES` (not next-token prefetch, which
    needs the model)."""
    capacity_bytes: int = 1
    """Fast-tier budget."""
    prefetch: PrefetchSettings = field(default_factory=PrefetchSettings)
    plans_after_output: bool = False
    """The predictor reads the layer's output (residual stream): it plans once the layer has
    run, not at its routing."""
    link: LinkModel | None = None
    """The times value-weighed prefetch prices reads at (default: the cost model's own)."""

    def __post_init__(self):
        if policy_named(self.policy).next_token:
            raise ValueError("the simulator has no model to guess the next token with; measure it with bench offload")


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
    peak_bytes: int
    stall_s_by_layer: list[float]
    recurrence: dict | None = None
    """How the sequences' past forecast their next tokens (policies that follow it)."""

    def summary(self) -> dict:
        moved = self.demand_loads + self.prefetch_loads
        return {
            **asdict(self),
            "simulated": True,
            "tokens_per_s": self.tokens / self.total_s if self.total_s else 0.0,
            "time_per_token_s": self.total_s / max(self.steps, 1),
            "stall_fraction": self.stall_s / max(self.total_s, 1e-12),
            "stall_ms_per_token": 1e3 * self.stall_s / max(self.tokens, 1),
            "stall_ms_per_token_by_layer": [1e3 * s / max(self.tokens, 1) for s in self.stall_s_by_layer],
            "hit_rate": self.hits / max(self.accesses, 1),
            "bytes_moved": moved * self.expert_bytes,
            "wasted_prefetch_bytes": self.wasted_prefetches * self.expert_bytes,
            "peak_fast_tier_bytes": self.peak_bytes,
        }


def plan_forecasts(
    probs: np.ndarray, prefetch: PrefetchSettings, rule: Policy, calibrate=None
) -> list[list[list[Row]]]:
    """A predictor's forecasts for every step and layer (rows of target layers, placed in
    their step when requested), from its scores (S, B, L, H, E) of every (step, sequence,
    layer, horizon), by the policy core's :func:`~specmoe.offload.policy.plan_rows`, pooled
    over the batch as decoding pools them. They do not depend on the fast tier's state, so
    one set serves a whole sweep; what is read of them does (``take_forecast``)."""
    steps, _, layers = probs.shape[:3]
    plans = []
    for s in range(steps):
        per_layer = []
        for layer in range(layers):
            rows = probs[s, :, layer]  # (B, H, E)
            present = rows.reshape(len(rows), -1).sum(-1) > 0  # slots with a token
            per_layer.append(
                plan_rows(rows[present], layer, layers, prefetch, rule, calibrate) if present.any() else []
            )
        plans.append(per_layer)
    return plans


def simulate(
    routing: np.ndarray,
    profile: HardwareProfile,
    expert_bytes: int,
    config: SimulationConfig,
    plans: list[list[list[Row]]] | None = None,
    log: EventLog | None = None,
    *,
    token_ids: np.ndarray | None = None,
    sequences: np.ndarray | None = None,
) -> SimulationResult:
    """Replay ``routing`` (S steps, B sequences, L layers, k); -1 is a dropped token, NO_TOKEN
    an empty slot. ``plans[s][l]``: what a predictor forecasts once layer l of step s has
    routed (from :func:`plan_forecasts`); needed by policies with a predictor. A policy that
    follows the sequences' recurrence needs each slot's ``token_ids`` and ``sequences`` (S,
    B). ``log`` records every decision (see :data:`~specmoe.offload.policy.EventLog`)."""
    steps, _, layers, top_k = routing.shape
    rule = policy_named(config.policy)
    settings = rule.resolve(config.prefetch, top_k=top_k, num_layers=layers)
    if rule.prefetch == "predictor" and plans is None:
        raise ValueError(f"policy {config.policy!r} needs a predictor's plans")
    per_layer = routing.transpose(0, 2, 1, 3).reshape(steps, layers, -1)  # a batch's union per layer
    eviction = rule.eviction_for(settings)
    residency: Residency[float] = Residency(
        config.capacity_bytes,
        eviction_policy(eviction, layers, future_uses(per_layer, layers) if eviction == "belady" else None),
        keeps_experts=rule.keeps_experts,
        log=log,
    )
    if rule.recurrence:
        if token_ids is None or sequences is None:
            raise ValueError(f"policy {config.policy!r} follows the sequences' tokens: pass token_ids and sequences")
        residency.outlook.recurrence = Recurrence(layers)
    if expert_bytes > config.capacity_bytes:
        raise ValueError(f"a fast tier of {config.capacity_bytes} B cannot hold one expert of {expert_bytes} B")
    queue = PrefetchQueue(log)
    transfer = profile.transfer_s(expert_bytes)
    link = config.link or LinkModel(transfer, profile.compute_s_per_layer)
    requested_at: dict[Key, float] = {}
    now = link_free = stall = 0.0
    by_layer = [0.0] * layers
    hits = late = demand = prefetched = accesses = 0
    tokens = int((routing[:, :, 0, 0] != NO_TOKEN).sum())

    def start_prefetches(until: float) -> None:
        """Start the queued transfers whose turn on the link comes before ``until``."""
        nonlocal link_free, prefetched
        while queue.entries and max(link_free, requested_at[queue.peek()[0]]) < until:
            key, _ = queue.pop()
            begin = max(link_free, requested_at.pop(key))
            if key not in residency and residency.admit(key, begin + transfer, expert_bytes, prefetch=True):
                link_free = begin + transfer
                prefetched += 1

    def request(requests: list[Request], position: int, at: float) -> None:
        for key, _ in queue.request(requests, residency.__contains__, position):
            requested_at[key] = at

    def forecast(step: int, layer: int, position: int, at: float) -> None:
        made = take_forecast(
            Forecast.of_rows(plans[step][layer], step, layers, position),
            rule,
            residency=residency,
            queue=queue,
            link=link,
            nbytes=lambda _layer: expert_bytes,
            present=residency.__contains__,
            position=position,
            busy_s=max(0.0, link_free - at),
        )
        for key, _ in made:
            requested_at[key] = at

    def experts_at(position: int) -> np.ndarray:
        return per_layer[position // layers, position % layers]

    for s in range(steps):
        if rule.recurrence:
            residency.begin_token(s, token_ids[s], sequences[s])
        for layer in range(layers):
            position = s * layers + layer
            need = [(layer, int(e)) for e in np.unique(per_layer[s, layer]) if e >= 0]
            if rule.prefetch == "predictor" and not config.plans_after_output:
                forecast(s, layer, position, now)
            residency.begin_layer(position, need, len(need) * expert_bytes)
            for key, _ in queue.begin_layer(position, set(need)):
                requested_at.pop(key, None)
            if rule.prefetch == "oracle":
                request(
                    oracle_requests(experts_at, position, settings.oracle_reach, steps * layers, layers), position, now
                )
            start_prefetches(now)
            ready = now
            for key in need:
                accesses += 1
                if key in residency:
                    if residency.get(key) <= now:
                        hits += 1
                        _record(log, "hit", key)
                    else:
                        late += 1
                        _record(log, "late", key)
                else:  # never refused: a layer wider than the tier is not pinned
                    if queue.take(key):
                        requested_at.pop(key)
                    _record(log, "miss", key)
                    link_free = max(now, link_free) + transfer
                    residency.admit(key, link_free, expert_bytes, prefetch=False)
                    demand += 1
                ready = max(ready, residency.get(key))
                residency.use(key)
            stall += ready - now
            by_layer[layer] += ready - now
            now = ready + profile.compute_s_per_layer
            start_prefetches(now)  # transfers under way while the layer computed
            residency.finish_layer(layer)
            for key, _ in queue.finish_layer(position):
                requested_at.pop(key, None)
            if rule.prefetch == "predictor" and config.plans_after_output:
                forecast(s, layer, position, now)
        residency.end_token(routing[s])
    return SimulationResult(
        config={
            "policy": config.policy,
            "capacity_bytes": config.capacity_bytes,
            "eviction": eviction,
            "prefetch": settings.model_dump(),
            "plans_after_output": config.plans_after_output,
        },
        steps=steps,
        tokens=tokens,
        total_s=now,
        stall_s=stall,
        accesses=accesses,
        hits=hits,
        late_prefetches=late,
        demand_loads=demand,
        prefetch_loads=prefetched,
        wasted_prefetches=residency.wasted_prefetches + len(residency.unused_prefetch),
        expert_bytes=expert_bytes,
        peak_bytes=residency.peak,
        stall_s_by_layer=by_layer,
        recurrence=residency.outlook.recurrence.stats() if rule.recurrence else None,
    )


def _record(log: EventLog | None, outcome: str, key: Key) -> None:
    if log is not None:
        log.append((outcome, key))


def capacity_bytes(fraction: float, layers: int, experts: int, expert_bytes: int) -> int:
    """A fast tier of ``fraction`` of all experts (see :meth:`TierSize.bytes_for`)."""
    return TierSize(fraction=fraction).bytes_for(layers * experts * expert_bytes, expert_bytes)
