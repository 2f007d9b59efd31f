"""One decoding run through the measured fast tier: the per-layer steps that the measured
replay (:mod:`specmoe.bench.replay`) and the model runtime (:mod:`.runtime`) share, in the
order the simulator takes them too:

1. :meth:`DecodingSession.begin_layer`: the layer has routed; its experts are pinned (if
   they fit) and queued requests it does not need are dropped;
2. plans and requests made at the routing (:meth:`submit`, :meth:`request`);
3. :meth:`fetch` of each expert the layer needs: a hit, a prefetch still in flight (late),
   or a demand read (a miss);
4. the layer computes; plans that read its output are submitted;
5. :meth:`finish_layer`: unpinned, its unused prefetches demoted, stale requests dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from specmoe.offload import Key
from specmoe.offload.live.fast_tier import FastTier, RuntimeStats
from specmoe.offload.live.prefetcher import Prefetcher, SynchronousPrefetcher
from specmoe.offload.live.tiers import Transfer
from specmoe.offload.policy import POLICIES, EventLog, Forecast, LinkModel, Policy, Request
from specmoe.offload.recurrence import Recurrence
from specmoe.offload.settings import PLANNING


class DecodingSession:
    """The fast tier, the prefetcher and the counters of one run over ``num_layers`` MoE
    layers (decode position: ``step * num_layers + layer``)."""

    def __init__(
        self,
        transfer: Transfer,
        budget_bytes: int,
        *,
        num_layers: int,
        eviction: str = "lru",
        prefetching: bool = False,
        keeps_experts: bool = True,
        planning: str = "background",
        future_uses: dict[Key, list[int]] | None = None,
        log: EventLog | None = None,
        rule: Policy = POLICIES["prefetch"],
        link: LinkModel | None = None,
    ):
        """``rule``: the policy whose selection turns forecasts into reads; ``link``: the times
        it weighs reads in (a ``learn``-ing model follows the reads and layers timed here)."""
        if planning not in PLANNING:
            raise ValueError(f"planning must be one of {', '.join(PLANNING)}, got {planning!r}")
        self.transfer, self.num_layers, self.planning, self.log = transfer, num_layers, planning, log
        self.link = link
        self.stats = RuntimeStats()
        self.tier = FastTier(
            budget_bytes, self.stats, eviction, future_uses, num_layers, keeps_experts=keeps_experts, log=log
        )
        prefetcher = SynchronousPrefetcher if planning == "synchronous" else Prefetcher
        self.prefetcher = (
            prefetcher(transfer, self.tier, self.stats, log, rule=rule, link=link) if prefetching else None
        )
        if rule.recurrence:
            self.tier.residency.outlook.recurrence = Recurrence(num_layers)
        self._layer_began: float | None = None
        self._stall_then = 0.0
        self._reading_then: float | None = None

    def position(self, step: int, layer: int) -> int:
        return step * self.num_layers + layer

    def begin_token(self, step: int, token_ids, sequences, earlier=None) -> None:
        """Step ``step`` decodes ``token_ids`` of ``sequences``, one per batch slot, after the
        ``earlier`` (B, T) tokens of a prompt if it has them: what a policy following the
        sequences' recurrence matches their past by; others ignore it."""
        with self.predicting(), self.tier.lock:
            self.tier.residency.begin_token(step, token_ids, sequences, earlier)

    def end_token(self, routing, earlier=None) -> None:
        """The step has run; ``routing`` (B, L, k): each slot's experts (``earlier``: (B, T, L,
        k), those of the prompt's earlier tokens)."""
        with self.predicting(), self.tier.lock:
            self.tier.residency.end_token(routing, earlier)

    def begin_layer(self, step: int, layer: int, experts: list[int]) -> list[Key]:
        now = time.perf_counter()
        timed = self.link is not None and self.prefetcher is not None  # reading_s takes the tier's lock
        reading = self.prefetcher.reading_s() if timed else None
        if self.link is not None and self._layer_began is not None:  # a layer's time, its stall left out
            stalled, took = self.stats.stall_s - self._stall_then, now - self._layer_began
            beside = None
            if stalled == 0 and reading is not None and self._reading_then is not None:
                beside = (reading - self._reading_then) / took
            self.link.observe_layer(took - stalled, beside)
        self._layer_began, self._stall_then, self._reading_then = now, self.stats.stall_s, reading
        keys = [(layer, e) for e in experts]
        position = self.position(step, layer)
        with self.tier.lock:
            self.tier.residency.begin_layer(position, keys, len(keys) * self.transfer.expert_nbytes(layer))
        if self.prefetcher is not None:
            self.prefetcher.begin_layer(position, set(keys))
        return keys

    def request(self, requests: list[Request]) -> None:
        """Requests known without planning (the oracle's)."""
        self.prefetcher.request(requests)

    def submit(self, make_forecast: Callable[[], Forecast], *, keep: bool = False) -> None:
        """Hand a plan over (or, planning inline, make it here); unless ``keep``, a newer plan
        replaces it if it has not started."""
        with self.predicting():
            if self.planning == "inline":
                self.prefetcher.forecast(make_forecast())
            else:
                self.prefetcher.plan(make_forecast, keep=keep)

    @contextmanager
    def predicting(self):
        """Time prediction work on the decoding thread (wall time includes waiting for a core
        or the GIL; CPU time is the thread's own work)."""
        began, began_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.stats.predict_s += time.perf_counter() - began
            self.stats.predict_cpu_s += time.thread_time() - began_cpu

    def fetch(self, key: Key) -> list[torch.Tensor]:
        """One expert's tensors, ready for the current stream: from the fast tier (hit), from
        a prefetch still loading (late), or read now from the slow tier (miss)."""
        stats, tier, prefetcher = self.stats, self.tier, self.prefetcher
        began = time.perf_counter()
        loaded = tier.get(key)
        if loaded is None and prefetcher is not None and prefetcher.wait_for(key):
            loaded = tier.get(key)
            if loaded is not None:
                self._record("late", key)
                loaded.wait_host()
                stats.stalled(key[0], began)
                return loaded.for_compute()
        if loaded is not None:
            if loaded.in_flight():  # a GPU copy queued by the prefetcher has not landed yet
                self._record("late", key)
                loaded.wait_host()
                stats.stalled(key[0], began)
            else:
                self._record("hit", key)
            return loaded.for_compute()
        nbytes = self.transfer.expert_nbytes(key[0])
        if prefetcher is not None:
            with prefetcher.demand_read():
                loaded = self.transfer.load(key, demand=True)
                loaded.wait_host()
        else:
            loaded = self.transfer.load(key, demand=True)
            loaded.wait_host()
        stats.stalled(key[0], began)
        if self.link is not None:
            self.link.observe_read(time.perf_counter() - began)
        self._record("miss", key)
        stats.demand_reads += 1
        stats.bytes_read += nbytes
        tier.put(key, loaded, nbytes, prefetch=False)
        return loaded.for_compute()

    def finish_layer(self, step: int, layer: int) -> None:
        if self.prefetcher is not None:  # synchronous reads are made here, before the unpinning
            self.prefetcher.finish_layer(self.position(step, layer))
        with self.tier.lock:
            self.tier.residency.finish_layer(layer)

    def restart_counts(self) -> None:
        """Counters start over (after a warm-up); the fast tier keeps what it holds."""
        self.stats.__init__()
        self.tier.restart_counts()
        self._layer_began, self._stall_then, self._reading_then = None, 0.0, None

    def results(self) -> dict:
        residency = self.tier.residency
        stats = self.stats.to_dict()
        stats["wasted_prefetches"] = residency.wasted_prefetches + len(residency.unused_prefetch)
        stats["wasted_prefetch_bytes"] = residency.wasted_bytes + residency.unused_bytes()
        if residency.outlook is not None and residency.outlook.recurrence is not None:
            stats |= residency.outlook.recurrence.stats()
        if self.link is not None:
            stats["link_model"] = self.link.to_dict()
        return stats

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()

    def _record(self, outcome: str, key: Key) -> None:
        counter = {"hit": "hits", "late": "late", "miss": "misses"}[outcome]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        if self.log is not None:
            self.log.append((outcome, key))
