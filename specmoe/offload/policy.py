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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from specmoe.errors import InputError
from specmoe.offload import Key
from specmoe.offload.eviction import EVICTIONS
from specmoe.offload.forecast import Forecast, LinkModel, Row, forecast_rows
from specmoe.offload.recurrence import Recurrence
from specmoe.offload.residency import EventLog, PrefetchQueue, Request, Residency
from specmoe.offload.value import choose_by_value
from specmoe.settings import Settings

__all__ = [
    "GAP_LEGEND",
    "POLICIES",
    "PRESETS",
    "EventLog",
    "Forecast",
    "LinkModel",
    "Policy",
    "PrefetchQueue",
    "PrefetchSettings",
    "Request",
    "Residency",
    "choose_prefetches",
    "in_token_requests",
    "lru_gap_closed",
    "oracle_requests",
    "plan_rows",
    "policy_named",
    "predictors_for",
    "prefetch_horizons",
    "rows_for",
    "take_forecast",
]


# --- what a policy is ----------------------------------------------------------------------
Preset = Callable[[int, int], dict]
"""(top_k, num_layers) -> the prefetch settings a policy fixes."""


@dataclass(frozen=True)
class Policy:
    name: str
    prefetch: Literal["none", "predictor", "oracle"]
    """Where foresight comes from: nothing, a predictor's forecasts, or the recorded future."""
    eviction: str | None
    """None: the prefetch settings' ``eviction``."""
    description: str
    keeps_experts: bool = True
    """False for on-demand, which drops every expert once its layer has run."""
    next_token: bool = False
    """Also forecast the next token's first layers from a guess of that token."""
    selection: Literal["budget", "value", "none"] = "budget"
    """How a predictor's forecasts become reads: the likeliest ``experts_per_layer`` per
    target layer, by expected benefit against cost (:mod:`specmoe.offload.value`), or none
    (the forecasts only inform eviction)."""
    reach: Literal["all", "farthest"] = "all"
    """Target layers l+1..l+N, or only l+N (a stride prefetcher's)."""
    preset: Preset | None = None
    """Prefetch settings the policy fixes, whatever the options say."""
    predictor: str | None = None
    """The predictor the policy was built around (a benchmark runs it with that one when given)."""
    recurrence: bool = False
    """Forecast the next tokens from the sequence's own past (:mod:`specmoe.offload.recurrence`):
    for eviction, and, by value, reads into the next token."""

    @property
    def kind(self) -> Literal["floor", "cache", "prefetch", "bound"]:
        """How reports group it: the floor (on-demand), caches (nothing read ahead), prefetchers
        (a predictor's forecasts read ahead), and bounds (the recorded future: no real run has it)."""
        if not self.keeps_experts:
            return "floor"
        if self.prefetch == "oracle" or self.eviction == "belady":
            return "bound"
        return "cache" if self.prefetch == "none" or self.selection == "none" else "prefetch"

    def eviction_for(self, settings: PrefetchSettings) -> str:
        return self.eviction or settings.eviction

    def resolve(self, settings: PrefetchSettings, *, top_k: int, num_layers: int) -> PrefetchSettings:
        """``settings`` resolved for the model, with what this policy fixes."""
        resolved = settings.resolve(top_k=top_k, num_layers=num_layers)
        return resolved.model_copy(update=self.preset(top_k, num_layers)) if self.preset else resolved


def _every_layer_ahead(top_k: int, layers: int) -> dict:
    return {"layers_ahead": max(layers - 1, 1)}


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("on-demand", "none", "lru", "load what each layer needs and keep nothing (the floor)", False),
        Policy("lru", "none", "lru", "cache, least recently used evicted"),
        Policy("lfu", "none", "lfu", "cache, least frequently used evicted"),
        Policy("lrfu", "none", "lrfu", "cache, least by frequency decaying with a 16-token half-life"),
        Policy("belady", "none", "belady", "cache evicting by the recorded future (caching's offline optimum)"),
        Policy(
            "next-use",
            "predictor",
            "next-use",
            "cache evicting the expert whose next use a predictor (else its use rate) puts farthest away",
            selection="none",
            preset=_every_layer_ahead,
        ),
        Policy("prefetch", "predictor", None, "a predictor's guesses prefetched"),
        Policy(
            "prefetch+next-token",
            "predictor",
            None,
            "prefetch, and the next token's first layers from a guess of that token",
            next_token=True,
        ),
        Policy(
            "cost-aware",
            "predictor",
            None,
            "calibrated guesses read when the expected stall saved beats the link time and eviction risk",
            selection="value",
            preset=_every_layer_ahead,
        ),
        Policy(
            "cost-aware+next-use",
            "predictor",
            "next-use",
            "cost-aware prefetch with next-use eviction",
            selection="value",
            preset=_every_layer_ahead,
        ),
        Policy(
            "cost-aware+next-token",
            "predictor",
            "next-use",
            "cost-aware prefetch with next-use eviction, into the next token from a guess of it",
            next_token=True,
            selection="value",
            preset=_every_layer_ahead,
        ),
        Policy(
            "cost-aware+recurrence",
            "predictor",
            "next-use",
            "cost-aware+next-use, with the sequence's own past forecasting its next tokens",
            selection="value",
            preset=_every_layer_ahead,
            recurrence=True,
        ),
        Policy("oracle-prefetch", "oracle", None, "the recorded future prefetched, evicted as prefetch evicts"),
        Policy("oracle", "oracle", "belady", "the recorded future prefetched and evicted by (the ceiling)"),
        # The anchors' policies (docs/offloading.md, "Presets": what each reproduces, what it leaves out)
        Policy(
            "mixtral-offloading",
            "predictor",
            "lru-per-layer",
            "preset: an LRU cache per layer, the next layer's top-k guessed by its gate on this layer's state",
            preset=lambda k, layers: {"layers_ahead": 1, "experts_per_layer": k, "min_probability": 0.0},
            predictor="lookahead",
        ),
        Policy(
            "moe-infinity",
            "predictor",
            "lfu",
            "preset: the sequence's activation history matched to recorded ones, every later layer's top-k",
            preset=lambda k, layers: {"layers_ahead": max(layers - 1, 1), "experts_per_layer": k},
            predictor="history",
        ),
        Policy(
            "fate",
            "predictor",
            "lru",
            "preset: the next layer's gate on this layer's state, a widened set of 2 x top-k",
            preset=lambda k, layers: {"layers_ahead": 1, "experts_per_layer": 2 * k, "min_probability": 0.0},
            predictor="lookahead",
        ),
        Policy(
            "promoe",
            "predictor",
            "lru",
            "preset: stride prefetch, the top-k of layer l+2 predicted at layer l",
            reach="farthest",
            preset=lambda k, layers: {"layers_ahead": 2, "experts_per_layer": k, "min_probability": 0.0},
        ),
    )
}
PRESETS = ("mixtral-offloading", "moe-infinity", "fate", "promoe")


def predictors_for(rule: Policy, names: list[str]) -> list[int]:
    """Which of the predictors called ``names`` a policy runs with: the one it was built
    around where given, else every one."""
    built_around = [i for i, name in enumerate(names) if name == rule.predictor]
    return built_around or list(range(len(names)))


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


def prefetch_horizons(
    layer: int, num_layers: int, settings: PrefetchSettings, rule: Policy, predicted: int
) -> list[int]:
    """The horizons a plan made at ``layer`` covers: 1..``layers_ahead`` (as far as the
    predictor predicts, ``predicted`` horizons, and within the stack), or, for a stride
    prefetcher, only the farthest of them."""
    ahead = min(settings.layers_ahead, predicted)
    horizons = [h for h in range(1, ahead + 1) if layer + h < num_layers]
    if rule.reach == "farthest":
        return horizons[-1:] if horizons and horizons[-1] == ahead else []
    return horizons


def plan_rows(
    probs,
    layer: int,
    num_layers: int,
    settings: PrefetchSettings,
    rule: Policy,
    calibrate: Callable[[np.ndarray, list[int]], np.ndarray] | None = None,
) -> list[Row]:
    """What a plan made at ``layer`` forecasts, from a predictor's scores (N, H, E) for
    horizons 1..H: per target layer (:func:`prefetch_horizons`), the experts the policy's
    selection weighs, with their probabilities (``calibrate(scores, horizons)``, else the
    scores clipped to [0, 1]). A fixed budget lists what :func:`choose_prefetches` picks
    from the scores; the other selections list twice ``experts_per_layer`` candidates."""
    if hasattr(probs, "detach"):
        probs = probs.detach().float().cpu().numpy()
    probs = np.asarray(probs, dtype=np.float32)
    horizons = prefetch_horizons(layer, num_layers, settings, rule, probs.shape[1])
    if not horizons:
        return []
    raw = probs[:, [h - 1 for h in horizons]]
    targets = [layer + h for h in horizons]
    calibrated = calibrate(raw, horizons) if calibrate is not None else raw
    return rows_for(raw, calibrated, targets, settings, by_value=rule.selection != "budget")


def rows_for(
    raw: np.ndarray, calibrated: np.ndarray, targets: list[int], settings: PrefetchSettings, *, by_value: bool
) -> list[Row]:
    """Rows for ``targets`` from scores and their probabilities (N, H, E): what
    :func:`choose_prefetches` picks from the scores (a fixed budget), or (``by_value``)
    twice ``experts_per_layer`` candidates by probability."""
    if by_value:
        return forecast_rows(calibrated, targets, 2 * settings.experts_per_layer)
    keys = choose_prefetches(raw, targets, settings.experts_per_layer, settings.min_probability)
    chosen = [[e for t, e in keys if t == target] for target in targets]
    return forecast_rows(calibrated, targets, settings.experts_per_layer, chosen)


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


def take_forecast(
    forecast: Forecast,
    rule: Policy,
    *,
    residency: Residency,
    queue: PrefetchQueue,
    link: LinkModel | None,
    nbytes: Callable[[int], int],
    present: Callable[[Key], bool],
    position: int,
    busy_s: float = 0.0,
) -> list[Request]:
    """A forecast arrives while decoding is at ``position``: the fast tier's outlook learns
    it, the policy's selection picks the reads, the queue takes those it does not hold;
    returns them. The one place every engine hands a predictor's forecast over."""
    at = max(position, forecast.made_at)
    recurrence = residency.outlook.recurrence if residency.outlook is not None else None
    if rule.recurrence and recurrence is not None:
        forecast = with_recurrence(forecast, recurrence, at)
    if residency.outlook is not None:
        residency.outlook.observe(forecast)
    if rule.selection == "none":
        return []
    if rule.selection == "value":
        if link is None:
            raise ValueError(f"policy {rule.name!r} weighs reads by their time: give the engine a link model")
        chosen = choose_by_value(
            forecast,
            position=at,
            queue=queue,
            residency=residency,
            link=link,
            nbytes=nbytes,
            present=present,
            busy_s=busy_s,
        )
    else:
        chosen = forecast.entries
    return queue.request([(k, p) for k, p, _ in chosen], present, at, {k: q for k, _, q in chosen})


def with_recurrence(forecast: Forecast, recurrence: Recurrence, position: int) -> Forecast:
    """``forecast`` made at ``position`` joined with what the sequences' past says: of this
    token's later layers (an expert either lists gets the likelier chance; one neither lists
    is bounded by both) and of the next token's layers already passed in this one."""
    layer = position % recurrence.num_layers
    now_entries, now_rest = recurrence.this_token(after_layer=layer)
    next_entries, next_rest = recurrence.next_token(upto_layer=layer)
    chance = {(key, at): q for key, at, q in forecast.entries}
    for key, at, q in now_entries:
        chance[key, at] = max(q, chance.get((key, at), 0.0))
    bounds = dict(forecast.rest)
    for at, bound in now_rest:
        bounds[at] = min(bound, bounds.get(at, 1.0))
    entries = tuple((key, at, q) for (key, at), q in chance.items()) + tuple(next_entries)
    return Forecast(forecast.made_at, entries, tuple(bounds.items()) + tuple(next_rest))


# --- how a run compares ----------------------------------------------------------------------
GAP_LEGEND = "LRU gap: the share of LRU's stall per token above the oracle's that the policy removes (LRU 0, oracle 1)"


def lru_gap_closed(rows: list[dict], stall_of: Callable[[dict], float]) -> None:
    """Sets each row's ``lru_gap_closed``: the share of the stall per token that LRU leaves
    above the oracle's which the row's policy removes (1: the oracle's stall, 0: LRU's,
    negative: more than LRU's). ``rows`` are one configuration's runs (a tier size and batch
    size); None where LRU or the oracle did not run or LRU already stalls no more than it."""
    lru = next((stall_of(r) for r in rows if r["policy"] == "lru"), None)
    oracle = next((stall_of(r) for r in rows if r["policy"] == "oracle"), None)
    closable = None if lru is None or oracle is None else lru - oracle
    for row in rows:
        row["lru_gap_closed"] = (lru - stall_of(row)) / closable if closable and closable > 0 else None
