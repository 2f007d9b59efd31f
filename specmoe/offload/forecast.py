"""Forecasts of expert use, and what the policy core knows of each expert's next use.

A predictor's calibrated probabilities become a :class:`Forecast`: for upcoming decode
positions, how likely each listed expert is to be needed there, and a bound for every expert
not listed. Forecasts drive prefetch (by budget or by value, :mod:`specmoe.offload.value`)
and prediction-aware eviction: the :class:`Outlook` combines the latest forecast with a use
rate decaying with a half-life of tokens (recency and frequency, as LRFU counts them) into a
chance of use at an expert's next opportunity and an expected wait until its next use (what
Belady evicts by, estimated). The :class:`LinkModel` holds the times the value of a read is
weighed in. Shared by every engine through :class:`specmoe.offload.policy.Residency`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from specmoe.offload import Key
from specmoe.offload.recurrence import Recurrence

Prediction = tuple[Key, int, float]
"""An expert, the decode position whose layer may need it, and the probability it will."""
Row = tuple[int, tuple[tuple[int, float], ...], float]
"""A forecast for one target layer, before it is placed in a step: the layer, its listed
experts with their probabilities (likeliest first) and the bound for every other expert."""
LRFU_HALF_LIFE_TOKENS = 16
"""Picked from 8, 16, 32 and 64 on the validation split of olmoe-64e decoding traces
(docs/benchmarks.md, "Where the gap to the oracle is")."""


@dataclass(frozen=True)
class Forecast:
    """What a plan made at decode position ``made_at`` expects."""

    made_at: int
    entries: tuple[Prediction, ...] = ()
    rest: tuple[tuple[int, float], ...] = ()
    """Per position covered: the probability bound of every expert the entries leave out."""

    @classmethod
    def of_rows(cls, rows: Sequence[Row], step: int, num_layers: int, made_at: int) -> Forecast:
        """Rows of target layers placed in decode step ``step`` (the token being decoded, or,
        with ``step + 1``, the next one)."""
        base = step * num_layers
        entries = tuple(((layer, e), base + layer, q) for layer, listed, _ in rows for e, q in listed)
        return cls(made_at, entries, tuple((base + layer, bound) for layer, _, bound in rows))

    def requests(self) -> list[tuple[Key, int]]:
        return [(key, position) for key, position, _ in self.entries]


def pooled(probabilities: np.ndarray) -> np.ndarray:
    """(N, H, E) per-token probabilities -> (H, E): the chance at least one of the N tokens
    needs the expert (tokens taken as independent)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    return p[0] if len(p) == 1 else 1.0 - np.prod(1.0 - p, axis=0)


def forecast_rows(
    calibrated: np.ndarray, target_layers: Sequence[int], per_layer: int, chosen: Sequence[Sequence[int]] | None = None
) -> list[Row]:
    """Rows for ``target_layers`` from calibrated probabilities (N, H, E), horizon h
    predicting ``target_layers[h]``: the experts ``chosen`` per target layer (by the
    fixed-budget rule, :func:`~specmoe.offload.policy.choose_prefetches`), or else the
    ``per_layer`` likeliest, the candidates a value rule weighs. An expert's probability is
    its calibrated one pooled over the tokens; the bound is that of the likeliest expert left
    out."""
    q = pooled(calibrated[:, : len(target_layers)])  # (H, E)
    order = np.argsort(-q, axis=-1, kind="stable")
    rows = []
    for h, layer in enumerate(target_layers):
        if chosen is not None:
            listed = [int(e) for e in chosen[h]]
        else:
            listed = [int(e) for e in order[h, :per_layer] if q[h, e] > 0]
        kept = set(listed)
        bound = next((float(q[h, e]) for e in order[h] if int(e) not in kept), 0.0)
        rows.append((int(layer), tuple((e, float(q[h, e])) for e in listed), bound))
    return rows


@dataclass
class LinkModel:
    """The times the value of a read is weighed in: one expert's read on the link, one
    layer's compute, and how long a demand read waits when it arrives while a prefetch reads
    (the simulator's link finishes the transfer under way: half a read on average; a
    prefetch from disk pauses at its next chunk). Fixed (the simulator's cost model, the
    decision-parity tests) or ``learn``-ed from what the measured engines observe (moving
    averages; the wait stays the same fraction of a read)."""

    read_s: float
    layer_s: float
    demand_wait_s: float | None = None
    """Default: half a read."""
    compute_cost_s: float = 0.0
    """What a prefetch read adds to the time of the layers computing beside it, needed or not:
    nothing on a link that moves data without the compute's processors (a GPU's copy engine,
    the simulator's link); on a CPU whose reads take cycles from the layers, the read's time
    times the share of a layer's speed it takes (:meth:`compute_cost_of`)."""
    learn: bool = False
    learn_compute_cost: bool = False
    """Also learn ``compute_cost_s`` as decoding goes (the runtime's way: it runs no
    interference probe): :meth:`observed_compute_cost`, once both times have been seen; until
    then it stays as given."""
    smoothing: float = 0.1
    layer_alone_s: float | None = field(default=None, init=False)
    """A layer's time with no prefetch read beside it, as observed (None: not yet)."""
    layer_beside_read_s: float | None = field(default=None, init=False)
    """A layer's time with a prefetch read beside it throughout, as observed."""

    def __post_init__(self):
        if self.read_s < 0 or self.layer_s <= 0 or self.compute_cost_s < 0:
            raise ValueError(
                f"a link model needs read_s >= 0, layer_s > 0 and compute_cost_s >= 0, "
                f"got {self.read_s}, {self.layer_s}, {self.compute_cost_s}"
            )
        if self.demand_wait_s is None:
            self.demand_wait_s = 0.5 * self.read_s

    @staticmethod
    def compute_cost_of(read_s: float, layer_alone_s: float, layer_beside_read_s: float) -> float:
        """The compute a read of ``read_s`` costs when a layer takes ``layer_alone_s`` alone and
        ``layer_beside_read_s`` beside a read (an interference probe's figures): while it reads,
        the layers advance at ``alone / beside`` of their speed."""
        if layer_beside_read_s <= layer_alone_s:
            return 0.0
        return read_s * (1.0 - layer_alone_s / layer_beside_read_s)

    def observe_read(self, seconds: float) -> None:
        if self.learn:
            share = self.demand_wait_s / self.read_s if self.read_s > 0 else 0.5
            self.read_s += self.smoothing * (seconds - self.read_s)
            self.demand_wait_s = share * self.read_s

    def observe_layer(self, seconds: float, beside_read: float | None = None) -> None:
        """A layer took ``seconds``, its stall left out; ``beside_read``: the share of that
        time a prefetch read ran beside it (None: not known, or the layer waited for a read)."""
        if not (self.learn and seconds > 0):
            return
        self.layer_s += self.smoothing * (seconds - self.layer_s)
        if beside_read is None:
            return
        # Only the clear cases: a layer partly beside a read says little of either time.
        if beside_read <= 0.1:
            self.layer_alone_s = self._moved(self.layer_alone_s, seconds)
        elif beside_read >= 0.9:
            self.layer_beside_read_s = self._moved(self.layer_beside_read_s, seconds)
        observed = self.observed_compute_cost()
        if self.learn_compute_cost and observed is not None:
            self.compute_cost_s = observed

    def observed_compute_cost(self) -> float | None:
        """What a read costs the layers beside it, from the layers timed with no prefetch read
        beside them and those timed beside one throughout (None: not both seen yet). Followed
        by a model that learns it; reported beside a probe's figure by one that does not."""
        if self.layer_alone_s is None or self.layer_beside_read_s is None:
            return None
        return self.compute_cost_of(self.read_s, self.layer_alone_s, self.layer_beside_read_s)

    def _moved(self, average: float | None, seconds: float) -> float:
        return seconds if average is None else average + self.smoothing * (seconds - average)

    def to_dict(self) -> dict:
        """The times as a run ends, in milliseconds (what results report)."""
        observed = self.observed_compute_cost()
        return {
            "read_ms": 1e3 * self.read_s,
            "layer_ms": 1e3 * self.layer_s,
            "compute_cost_ms": 1e3 * self.compute_cost_s,
            "compute_cost_observed_ms": None if observed is None else 1e3 * observed,
            "layer_alone_ms": None if self.layer_alone_s is None else 1e3 * self.layer_alone_s,
            "layer_beside_read_ms": None if self.layer_beside_read_s is None else 1e3 * self.layer_beside_read_s,
            "learnt": self.learn,
            "compute_cost_learnt": self.learn_compute_cost,
        }


class Outlook:
    """Each expert's next use as far as it can be told: the latest forecast for the expert's
    next opportunity (the next position of its layer), else its use rate per token.

    The use rate is an LRFU score (each use adds 1, halving every ``half_life_tokens``
    tokens) times ``1 - 2^(-1/half_life_tokens)``: 1 for an expert used at every token, 0
    for one never used. Kept in arrays by (layer, expert), so that a full fast tier ranks
    all its residents at once (:meth:`expected_waits`): eviction asks at every admission."""

    def __init__(self, num_layers: int, half_life_tokens: float = LRFU_HALF_LIFE_TOKENS):
        self.num_layers = num_layers
        self.half_life = half_life_tokens * num_layers  # in positions
        self.per_token = 1.0 - 2.0 ** (-1.0 / half_life_tokens)
        self.log_score = np.full((num_layers, 64), -np.inf)
        """log2 of the LRFU score at position 0: comparing needs no decaying."""
        self.predicted_at = np.full((num_layers, 64), -1, dtype=np.int64)
        self.predicted = np.zeros((num_layers, 64))
        """The newest forecast of each expert: the position, and the chance of use there."""
        self.bounds: dict[int, float] = {}
        self.recurrence: Recurrence | None = None
        """The sequence's own past, where the engine feeds it tokens: what is said of the next
        tokens beyond the forecasts (:mod:`specmoe.offload.recurrence`)."""

    def _fit(self, layer: int, expert: int) -> None:
        """Room for layers up to ``layer`` and expert ids up to ``expert``."""
        rows, width = self.log_score.shape
        if layer >= rows or expert >= width:
            pad = ((0, max(layer + 1 - rows, 0)), (0, max(2 * width, expert + 1) - width if expert >= width else 0))
            self.log_score = np.pad(self.log_score, pad, constant_values=-np.inf)
            self.predicted_at = np.pad(self.predicted_at, pad, constant_values=-1)
            self.predicted = np.pad(self.predicted, pad)

    def on_use(self, key: Key, position: int) -> None:
        layer, expert = key
        self._fit(layer, expert)
        now = position / self.half_life
        score = 2.0 ** (self.log_score[layer, expert] - now)
        self.log_score[layer, expert] = math.log2(score + 1.0) + now

    def observe(self, forecast: Forecast) -> None:
        """The newest forecast overrides older ones for the positions it covers."""
        for position, bound in forecast.rest:
            self.bounds[position] = bound
        for (layer, expert), position, q in forecast.entries:
            self._fit(layer, expert)
            self.predicted_at[layer, expert], self.predicted[layer, expert] = position, q
        if len(self.bounds) > 4 * self.num_layers:  # forget positions long past
            for position in [p for p in self.bounds if p < forecast.made_at]:
                del self.bounds[position]

    def rate(self, key: Key, position: int) -> float:
        layer, expert = key
        self._fit(layer, expert)
        return min(1.0, 2.0 ** (float(self.log_score[layer, expert]) - position / self.half_life) * self.per_token)

    def next_opportunity(self, key: Key, position: int) -> int:
        """The first position after ``position`` whose layer is the expert's."""
        ahead = (key[0] - position) % self.num_layers
        return position + (ahead or self.num_layers)

    def chance_next(self, key: Key, position: int) -> float:
        """The probability the expert is needed at its next opportunity (one expert: in
        Python, which beats numpy on a single value)."""
        layer, expert = key
        rate = self.rate(key, position)
        nxt = self.next_opportunity(key, position)
        if self.predicted_at[layer, expert] == nxt:
            return float(self.predicted[layer, expert])
        bound = self.bounds.get(nxt)  # covered, and not listed: no likelier than the bound
        if bound is None and self.recurrence is not None:
            said = self.recurrence.chance(key, nxt // self.num_layers, rate)
            return rate if said is None else said
        return rate if bound is None else min(rate, bound)

    def expected_wait(self, key: Key, position: int) -> float:
        return float(self.expected_waits([key], position)[0])

    def expected_waits(self, keys: list[Key], position: int) -> np.ndarray:
        """Positions until each expert's next use, expected: its next opportunity, then the
        tokens the recurrence forecasts, and after those a wait at its use rate (geometric
        over tokens)."""
        layers, experts = self._index(keys)
        ahead = (layers - position) % self.num_layers
        distance = np.where(ahead == 0, self.num_layers, ahead)
        rates = np.maximum(self._rates(layers, experts, position), 1e-6)
        missed = 1.0 - self._chances(layers, experts, position)  # the chance it is not used yet
        waits = distance.astype(np.float64)
        if self.recurrence is not None:  # each later token it forecasts, a token apart
            first_step = (position + distance) // self.num_layers
            later = first_step[None, :] + np.arange(1, self.recurrence.reach + 1)[:, None]  # (R, N)
            for chance in self._recurring(layers, experts, later, rates):
                waits += missed * self.num_layers  # not used at the opportunity before: one token more
                missed = missed * (1.0 - chance)
        return waits + self.num_layers * missed / rates

    def _recurring(self, layers: np.ndarray, experts: np.ndarray, steps, otherwise: np.ndarray) -> np.ndarray:
        """The recurrence's chance of each expert at its step; ``otherwise`` where it says
        nothing, and no more than that for an expert it does not list."""
        said, listed = self.recurrence.chances(layers, experts, steps)
        said = np.where(listed, said, np.minimum(said, otherwise))
        return np.where(np.isnan(said), otherwise, said)

    def _index(self, keys: list[Key]) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(keys, dtype=np.int64).reshape(-1, 2)
        if len(index):
            self._fit(int(index[:, 0].max()), int(index[:, 1].max()))
        return index[:, 0], index[:, 1]

    def _rates(self, layers: np.ndarray, experts: np.ndarray, position: int) -> np.ndarray:
        score = np.exp2(self.log_score[layers, experts] - position / self.half_life)
        return np.minimum(1.0, score * self.per_token)

    def _chances(self, layers: np.ndarray, experts: np.ndarray, position: int) -> np.ndarray:
        ahead = (layers - position) % self.num_layers
        nxt = position + np.where(ahead == 0, self.num_layers, ahead)
        chances = self._rates(layers, experts, position)
        for target in np.unique(nxt):  # covered, and not listed: no likelier than the bound
            if int(target) in self.bounds:
                at = nxt == target
                chances[at] = np.minimum(chances[at], self.bounds[int(target)])
        if self.recurrence is not None:  # where no forecast covers the opportunity
            uncovered = ~np.isin(nxt, np.fromiter(self.bounds, dtype=np.int64, count=len(self.bounds)))
            chances = np.where(uncovered, self._recurring(layers, experts, nxt // self.num_layers, chances), chances)
        listed = self.predicted_at[layers, experts] == nxt
        return np.where(listed, self.predicted[layers, experts], chances)
