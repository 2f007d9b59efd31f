"""Prefetch by value: a read is requested when its expected benefit beats its expected cost,
so the number of reads per layer is an outcome, not a setting.

The link model: one link, whose demand reads go first, each at the start of the layer that
needs it; prefetch reads use the rest of its time, which in a steady state is the time the
layers compute (``layer_s`` each). So a prefetch for the layer ``d`` layers ahead, with
``ahead`` reads queued before it (deadline order), finishes in time if ``(ahead + 1)`` reads
fit in ``d`` layers' compute; else it is late by the difference, and by a read's time it
is no better than the demand read that replaces it.

For a candidate (an expert, the position that may need it, the calibrated probability q
that it will):

- **benefit**: q times the stall it saves: a read's time, less how late it would be;
- **cost on the link**: the reads queued after it each finish one read later (each loses
  its probability times the stall that adds), and a demand read that arrives while it is
  under way waits ``link.demand_wait_s`` (a layer starts while it reads with the chance a
  read's time is of a layer's; a layer has demand reads at the rate averaged so far);
- **cost in the fast tier**: once the tier is full, the read evicts the next victim (the
  eviction policy's order), and costs a read if that expert is needed at its next
  opportunity: the :class:`~specmoe.offload.forecast.Outlook`'s chance, times a read;
- **cost to compute**: where reads take the processors' time (a CPU reading from disk), the
  layers computing beside a read slow down, whether or not the read is used
  (``link.compute_cost_s``; nothing where a copy engine moves the data).

Candidates are weighed likeliest first; each accepted read joins the schedule the next one
is weighed against. Reads are made as early as the prediction is good enough: a layer
several ahead, or the next token's, is requested once its probability earns it, and until
then the forecast is made again at every layer with more of the token known.
"""

from __future__ import annotations

from collections.abc import Callable

from specmoe.offload import Key
from specmoe.offload.forecast import Forecast, LinkModel
from specmoe.offload.residency import PrefetchQueue, Residency

Candidate = tuple[Key, int, float]


def _stall(finish: float, lead: float, read: float) -> float:
    """How long a layer waits for a read that needs ``finish`` of the link's free time when
    ``lead`` of it passes before the layer starts: no more than a demand read would take (a
    late request is read on demand instead)."""
    return min(read, max(0.0, finish - lead))


def choose_by_value(
    forecast: Forecast,
    *,
    position: int,
    queue: PrefetchQueue,
    residency: Residency,
    link: LinkModel,
    nbytes: Callable[[int], int],
    present: Callable[[Key], bool],
    busy_s: float = 0.0,
) -> list[Candidate]:
    """The forecast's candidates worth reading, as decoding stands at ``position`` with the
    link busy for ``busy_s`` more seconds; the likeliest first."""
    read, layer_s = link.read_s, link.layer_s
    if read <= 0:
        return []  # an instant link: a demand read costs nothing, and neither does waiting for it
    demand = residency.demand_per_layer
    interference = link.demand_wait_s * min(1.0, read / (layer_s + demand * read)) * min(1.0, demand)

    def start(ahead: int, target: int) -> float:
        return busy_s + ahead * read

    schedule = [(target, queue.probability.get(key, 1.0)) for key, target in queue.entries]  # deadline order
    free, taken = residency.capacity - residency.used, 0  # what the queued reads leave, and the victims they take
    for key, _ in queue.entries:
        if free >= nbytes(key[0]):
            free -= nbytes(key[0])
        else:
            taken += 1
    floor = interference + link.compute_cost_s  # what any read costs, used or not
    candidates = sorted(
        (
            c
            for c in forecast.entries
            if c[2] * read > floor and c[1] > position and not present(c[0]) and c[0] not in queue
        ),
        key=lambda c: -c[2],
    )  # a candidate whose whole read's worth does not pay the floor cannot pay more
    if not candidates:
        return []
    victims = _later(lambda: residency.victims(taken + len(candidates))[taken:])  # ranked once needed
    outlook = residency.outlook
    risk: dict = {}  # each victim's chance of use at its next opportunity
    chosen = []
    for key, target, q in candidates:
        ahead = sum(1 for t, _ in schedule if t <= target)
        lead = (target - position) * layer_s
        benefit = q * (read - _stall(start(ahead, target) + read, lead, read))
        if benefit <= 0:
            continue
        delay = 0.0
        for i in range(ahead, len(schedule)):  # the reads it would go before
            t, p = schedule[i]
            finish, later = start(i, t) + read, (t - position) * layer_s
            delay += p * (_stall(finish + read, later, read) - _stall(finish, later, read))
        size = nbytes(key[0])
        victim = None
        if free < size:
            victim = next(victims, None)
            if victim is not None and victim not in risk:
                risk[victim] = outlook.chance_next(victim, position)
            eviction = read * (risk[victim] if victim is not None else 1.0)
        else:
            eviction = 0.0
        if benefit - delay - eviction - floor > 0:
            chosen.append((key, target, q))
            schedule.insert(ahead, (target, q))
            free -= size if victim is None else 0
        elif victim is not None:  # not taken: the next candidate is weighed against it again
            victims = _prepend(victim, victims)
    return chosen


def _later(make):
    """The items ``make()`` returns, made when the first is asked for: ranking the residents
    for eviction is most of a plan's time, and a plan whose reads all fit needs none."""
    yield from make()


def _prepend(first, rest):
    yield first
    yield from rest
