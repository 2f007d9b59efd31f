"""The sequence's own past as a forecast of its next tokens' experts.

Eviction that knew which experts the next few tokens need would evict as Belady does; nothing
in a token's own layers says that. The sequence's past sometimes does: text repeats itself
(greedy decoding loops, quotes, code edited in place, answers copied from a retrieved
document), and where the last few tokens occurred before in the sequence, the tokens that
followed then often follow again (prompt-lookup decoding drafts tokens so), with the experts
they used then. A :class:`Recurrence` keeps each sequence's tokens and the experts each
used; at every new token it finds the latest earlier occurrence of the longest suffix (up to
``suffix`` tokens) and forecasts the next ``reach`` tokens' experts as those of the tokens
that followed it. How often such forecasts are right is counted as decoding goes, per
distance ahead, so the probabilities it gives need no fitting.

At batch > 1 the forecast of a token is the union of its sequences' forecasts; it says
nothing of an expert it does not list unless every sequence matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specmoe.offload import Key


@dataclass(frozen=True)
class Ahead:
    """The forecast for one token ahead: the experts some sequence's match lists, the chance
    each is used, and the chance of an expert not listed (None: some sequence did not match,
    so nothing is said of it)."""

    listed: frozenset[Key]
    chance_listed: float
    chance_other: float | None


class Recurrence:
    """Suffix matches over each sequence's tokens, and the forecasts they make (see module doc)."""

    def __init__(self, num_layers: int, *, suffix: int = 3, reach: int = 4):
        if suffix < 1 or reach < 1:
            raise ValueError(f"a recurrence needs suffix >= 1 and reach >= 1, got {suffix} and {reach}")
        self.num_layers, self.suffix, self.reach = num_layers, suffix, reach
        self.step = -1
        self.tokens: dict[int, list[int]] = {}
        """Per sequence id: its token ids so far."""
        self.index: dict[int, dict[tuple[int, ...], int]] = {}
        """Per sequence id: each suffix of up to ``suffix`` tokens, and where it last ended."""
        self.found: dict[int, int | None] = {}
        """Per sequence id: where the suffix ending at its newest token ended before."""
        self.used: dict[int, list[np.ndarray]] = {}
        """Per sequence id: the expert ids (L, k) each of its finished tokens used, kept as
        arrays: a long prompt's history stays a few hundred bytes a token."""
        self.slots: list[int] = []
        """The sequence each batch slot decodes at this step (negative: none)."""
        self.now: Ahead | None = None
        """The forecast for this step's own token: what the token that ended the same suffix
        before used (None: no sequence matched)."""
        self.ahead: list[Ahead | None] = []
        """Forecasts for tokens step+1..step+reach (None: no sequence matched)."""
        self._made: dict[int, list[tuple[int, frozenset[Key], bool]]] = {}
        """Forecasts to score: per target step, (distance, the experts listed, whether every
        sequence matched: only then is what it left out counted)."""
        self.hits = np.full(reach + 1, 8.0)  # per distance 0..reach; a prior of 0.8 right
        self.listed = np.full(reach + 1, 10.0)
        self.missed = np.full(reach + 1, 1.0)
        self.unlisted = np.full(reach + 1, 100.0)
        self.width = 1
        """Experts per layer, as far as seen (what an unlisted chance is counted over)."""
        self.tokens_seen = self.tokens_matched = 0
        self.scored_hits = self.scored_listed = 0
        self._table = np.zeros((reach, num_layers, 1), dtype=bool), np.full(reach, np.nan), np.full(reach, np.nan)
        """The forecasts as arrays: listed masks (reach, L, width), chances listed and not."""

    # --- what the engines feed it ---------------------------------------------------------
    def begin_token(
        self, step: int, token_ids: Sequence[int], sequences: Sequence[int], earlier: np.ndarray | None = None
    ) -> None:
        """Step ``step`` decodes ``token_ids[b]`` in sequence ``sequences[b]`` of each batch slot
        (a negative token id: the slot has none). A sequence id seen before continues it.
        ``earlier`` (B, T): tokens the step runs before each slot's (a prompt's), which the
        sequence's past then holds too (their experts: :meth:`end_token`)."""
        self.step = step
        self.slots = [int(q) if int(t) >= 0 else -1 for t, q in zip(token_ids, sequences)]
        for gone in set(self.tokens) - set(self.slots):  # finished sequences
            for kept in (self.tokens, self.index, self.found, self.used):
                kept.pop(gone, None)
        for b, (t, q) in enumerate(zip(token_ids, self.slots)):
            if q >= 0:
                for before in [] if earlier is None else earlier[b]:
                    self._append(q, int(before))
                self._append(q, int(t))
        self._forecast()

    def _append(self, sequence: int, token: int) -> None:
        """Add a token, remembering where the longest suffix it ends last ended before."""
        tokens = self.tokens.setdefault(sequence, [])
        index = self.index.setdefault(sequence, {})
        tokens.append(token)
        now = len(tokens) - 1
        tails = [tuple(tokens[now - length + 1 :]) for length in range(1, min(self.suffix, now + 1) + 1)]
        self.found[sequence] = next((index[t] for t in reversed(tails) if t in index), None)
        for tail in tails:
            index[tail] = now

    def end_token(self, routing: np.ndarray, earlier: np.ndarray | None = None) -> None:
        """The step has run: ``routing`` (B, L, k) holds each slot's experts (negative ids:
        none); ``earlier`` (B, T, L, k), those of the earlier tokens :meth:`begin_token` got."""
        used_now: set[Key] = set()
        for b, (q, experts) in enumerate(zip(self.slots, np.asarray(routing))):
            if q < 0:
                continue
            for before in [] if earlier is None else earlier[b]:
                self._remember(q, before)
            self._remember(q, experts)
            used_now |= self._keys(experts)
        for distance, listed, complete in self._made.pop(self.step, []):
            hit = len(listed & used_now)
            if distance == 1:
                self.scored_hits += hit
                self.scored_listed += len(listed)
            self.hits[distance] += hit
            self.listed[distance] += len(listed)
            if complete:
                self.missed[distance] += len(used_now) - hit
                self.unlisted[distance] += self.num_layers * self.width - len(listed)

    def stats(self) -> dict:
        """How often a step had a forecast of the next token, and how many of the experts those
        forecasts listed were used (measured, not the prior)."""
        return {
            "recurrence_matched": self.tokens_matched / self.tokens_seen if self.tokens_seen else None,
            "recurrence_precision": self.scored_hits / self.scored_listed if self.scored_listed else None,
        }

    def _remember(self, sequence: int, experts: np.ndarray) -> None:
        """Keep a token's expert ids (L, k) in its sequence's past."""
        kept = np.array(experts, dtype=np.int32)
        self.used.setdefault(sequence, []).append(kept)
        self.width = max(self.width, int(kept.max(initial=-1)) + 1)

    @staticmethod
    def _keys(experts: np.ndarray) -> frozenset[Key]:
        """(L, k) expert ids -> the (layer, expert) keys used."""
        return frozenset((layer, int(e)) for layer, row in enumerate(experts) for e in row if e >= 0)

    # --- what it forecasts ----------------------------------------------------------------
    def chance_listed(self, distance: int) -> float:
        return float(self.hits[distance] / self.listed[distance])

    def chance_other(self, distance: int) -> float:
        return float(self.missed[distance] / self.unlisted[distance])

    def _forecast(self) -> None:
        """Forecasts for distances 0 (this step's token) to ``reach``."""
        per_distance: list[set[Key]] = [set() for _ in range(self.reach + 1)]
        complete = [True] * (self.reach + 1)
        for q in self.slots:
            if q < 0:
                continue
            found, past = self.found[q], self.used.get(q, [])
            for i in range(self.reach + 1):
                if found is None or found + i >= len(past):
                    complete[i] = False
                else:
                    per_distance[i] |= self._keys(past[found + i])
        self.tokens_seen += 1
        self.tokens_matched += bool(per_distance[1])
        forecasts: list[Ahead | None] = []
        masks = np.zeros((self.reach, self.num_layers, self.width), dtype=bool)
        listed_p, other_p = np.full(self.reach, np.nan), np.full(self.reach, np.nan)
        for distance, keys in enumerate(per_distance):
            if not (keys or complete[distance]):
                forecasts.append(None)
                continue
            listed = frozenset(keys)
            self._made.setdefault(self.step + distance, []).append((distance, listed, complete[distance]))
            other = self.chance_other(distance) if complete[distance] else None
            forecasts.append(Ahead(listed, self.chance_listed(distance), other))
            if distance:
                for layer, e in listed:
                    masks[distance - 1, layer, e] = True
                listed_p[distance - 1], other_p[distance - 1] = (
                    forecasts[-1].chance_listed,
                    np.nan if other is None else other,
                )
        self.now, self.ahead = forecasts[0], forecasts[1:]
        self._table = masks, listed_p, other_p

    def chance(self, key: Key, step: int, rate: float) -> float | None:
        """The chance ``key`` is used at step ``step``, for an expert used at ``rate`` (None:
        no forecast says)."""
        said, listed = self.chances(np.array([key[0]]), np.array([key[1]]), np.array([step]))
        return None if np.isnan(said[0]) else float(said[0] if listed[0] else min(rate, said[0]))

    def chances(self, layers: np.ndarray, experts: np.ndarray, steps) -> tuple[np.ndarray, np.ndarray]:
        """Per expert (``layers[i]``, ``experts[i]``), the chance it is used at its step
        (``steps`` broadcasts against the experts, e.g. (R, N) for R steps each): NaN where no
        forecast says; and whether a match listed it (an expert not listed is no likelier than
        its use rate either)."""
        distances = np.asarray(steps) - self.step
        distances, layers, experts = np.broadcast_arrays(distances, layers, experts)
        said, listed = np.full(distances.shape, np.nan), np.zeros(distances.shape, dtype=bool)
        masks, listed_p, other_p = self._table
        known = (distances >= 1) & (distances <= len(listed_p))
        index = np.where(known, distances - 1, 0)
        known &= ~np.isnan(listed_p[index])
        inside = known & (experts < masks.shape[2])
        listed[inside] = masks[index[inside], layers[inside], experts[inside]]
        said[known] = np.where(listed[known], listed_p[index[known]], other_p[index[known]])
        return said, listed

    def this_token(self, after_layer: int) -> tuple[list[tuple[Key, int, float]], list[tuple[int, float]]]:
        """This step's forecast for its layers after ``after_layer``, as :meth:`next_token`
        gives it: what the token that ended the same suffix before used there."""
        if self.now is None:
            return [], []
        base, layers = self.step * self.num_layers, range(after_layer + 1, self.num_layers)
        entries = [(key, base + key[0], self.now.chance_listed) for key in sorted(self.now.listed) if key[0] in layers]
        rest = [] if self.now.chance_other is None else [(base + layer, self.now.chance_other) for layer in layers]
        return entries, rest

    def next_token(self, upto_layer: int) -> tuple[list[tuple[Key, int, float]], list[tuple[int, float]]]:
        """The next token's forecast for its layers 0..``upto_layer``, as a
        :class:`~specmoe.offload.forecast.Forecast` holds it: (expert, position, chance)
        entries, and (position, chance of any expert not listed). Only where every sequence
        matched: a read a token ahead holds its slot until then, and on the batch-16 traces of
        docs/benchmarks.md reading the union of partial forecasts cost more than it saved."""
        first = self.ahead[0] if self.ahead else None
        if first is None or first.chance_other is None:
            return [], []
        base, layers = (self.step + 1) * self.num_layers, range(min(upto_layer, self.num_layers - 1) + 1)
        entries = [(key, base + key[0], first.chance_listed) for key in sorted(first.listed) if key[0] in layers]
        return entries, [(base + layer, first.chance_other) for layer in layers]
