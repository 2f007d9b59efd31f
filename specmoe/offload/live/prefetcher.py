"""Who makes the prefetch reads of the measured fast tier: a background thread
(:class:`Prefetcher`), or the decoding thread itself (:class:`SynchronousPrefetcher`, no
overlap, for checking decisions). Both take requests into the policy core's
:class:`~specmoe.offload.policy.PrefetchQueue`, which decides when a request is stale."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

from specmoe.offload import Key
from specmoe.offload.live.fast_tier import FastTier, RuntimeStats
from specmoe.offload.live.tiers import Transfer
from specmoe.offload.policy import (
    POLICIES,
    EventLog,
    Forecast,
    LinkModel,
    Policy,
    PrefetchQueue,
    Request,
    take_forecast,
)

Plan = Callable[[], Forecast]


class _Requester:
    """What both prefetchers share: the queue, and forecasts handed to the policy core,
    whose selection (``rule``, priced with ``link``) picks the reads to request."""

    def __init__(
        self,
        transfer: Transfer,
        tier: FastTier,
        stats: RuntimeStats,
        log: EventLog | None = None,
        *,
        rule: Policy = POLICIES["prefetch"],
        link: LinkModel | None = None,
    ):
        self.transfer, self.tier, self.stats, self.rule, self.link = transfer, tier, stats, rule, link
        self.queue = PrefetchQueue(log)

    def _take(self, forecast: Forecast, present, busy_s: float = 0.0) -> list[Request]:
        added = take_forecast(
            forecast,
            self.rule,
            residency=self.tier.residency,
            queue=self.queue,
            link=self.link,
            nbytes=self.transfer.expert_nbytes,
            present=present,
            position=self.tier.residency.position,
            busy_s=busy_s,
        )
        self.stats.prefetch_requests += len(added)
        return added

    def reading_s(self) -> float | None:
        """Seconds a prefetch read has run so far, all reads together (None: reads never run
        beside the layers)."""
        return None

    def _planned(self, make_forecast: Plan) -> None:
        """Make a plan and hand its forecast over, timed as planning."""
        began, began_cpu = time.perf_counter(), time.thread_time()
        self.forecast(make_forecast())
        self.stats.plan_s += time.perf_counter() - began
        self.stats.plan_cpu_s += time.thread_time() - began_cpu


class Prefetcher(_Requester):
    """A background thread that plans prefetches and reads them into the fast tier, in
    request order.

    Planning runs here, not on the decoding thread (:meth:`plan`): the decoder hands over a
    plan and goes on computing, and a plan not yet started when a newer one arrives is
    dropped (the newer one has seen more routing, and the older one's nearest layer is
    already running), unless it was handed over with ``keep=True`` (a plan for the next
    token, which no later plan of this token covers). Plans run before the next read and
    between a read's chunks, so a plan waits for at most one chunk.

    A demand read goes first: while one runs (:meth:`demand_read`), a prefetch read pauses
    at its next chunk boundary. The decoder runs one read at a time, so while it waits for a
    prefetch no demand read holds that prefetch back.

    If planning or a read fails on the thread, the thread stops and the decoder's next call
    raises the failure, rather than waiting for a read that will never come."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_flight: dict[Key, threading.Event] = {}
        self.cond = threading.Condition(self.tier.lock)  # one lock for the tier and the queue
        self.stopped = False
        self.failure: BaseException | None = None
        self.demands = 0
        self.pending_plan: Plan | None = None
        self.kept_plans: deque[Plan] = deque()
        self._read_s, self._reading_since = 0.0, None
        self.thread = threading.Thread(target=self._run, name="specmoe-prefetch", daemon=True)
        self.thread.start()

    # --- the decoding thread's side ---------------------------------------------------------
    def request(self, requests: list[Request]) -> None:
        with self.cond:
            self._raise_failure()
            added = self.queue.request(requests, self._present, self.tier.residency.position)
            for key, _ in added:
                self.in_flight[key] = threading.Event()
            self.stats.prefetch_requests += len(added)
            self.cond.notify_all()

    def forecast(self, forecast: Forecast) -> None:
        """Hand a forecast to the policy core, which picks the reads to request."""
        with self.cond:
            self._raise_failure()
            reading = len(self.in_flight) > len(self.queue)  # a read under way holds the link
            busy = 0.5 * self.link.read_s if reading and self.link is not None else 0.0
            for key, _ in self._take(forecast, self._present, busy):
                self.in_flight[key] = threading.Event()
            self.cond.notify_all()

    def plan(self, make_requests: Plan, *, keep: bool = False) -> None:
        """Call ``make_requests`` on the prefetch thread and hand the forecast it returns
        over; unless ``keep``, a newer plan replaces it if it has not started."""
        with self.cond:
            self._raise_failure()
            if keep:
                self.kept_plans.append(make_requests)
            else:
                self.pending_plan = make_requests
            self.cond.notify_all()

    def begin_layer(self, position: int, needed: set[Key]) -> None:
        with self.cond:
            self._forget(self.queue.begin_layer(position, needed))

    def reading_s(self) -> float:
        with self.cond:
            since = self._reading_since
            return self._read_s + (time.perf_counter() - since if since is not None else 0.0)

    def finish_layer(self, position: int) -> None:
        with self.cond:
            self._forget(self.queue.finish_layer(position))

    def wait_for(self, key: Key) -> bool:
        """Block until an in-flight prefetch of ``key`` finishes; False if none is in flight
        (a request not yet started is taken back: the caller reads it itself)."""
        with self.cond:
            self._raise_failure()
            if self.queue.take(key):
                self.in_flight.pop(key).set()
                return False
            event = self.in_flight.get(key)
        if event is None:
            return False
        event.wait()
        with self.cond:
            self._raise_failure()
        return True

    @contextmanager
    def demand_read(self):
        """Around a read the decoder waits for: prefetch reads hold back until it is done."""
        with self.cond:
            self.demands += 1
        try:
            yield
        finally:
            with self.cond:
                self.demands -= 1
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=5)

    # --- the prefetch thread --------------------------------------------------------------
    def _present(self, key: Key) -> bool:
        return key in self.in_flight or key in self.tier.residency

    def _forget(self, dropped: list[Request]) -> None:
        """Requests the queue dropped unread are no longer in flight."""
        for key, _ in dropped:
            self.in_flight.pop(key).set()

    def _has_plans(self) -> bool:
        return self.pending_plan is not None or bool(self.kept_plans)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"the prefetch thread failed: {self.failure!r}") from self.failure

    def _between_chunks(self) -> None:
        self._run_plans()
        with self.cond:
            if self.demands and not self.stopped:
                self.stats.prefetch_pauses += 1
            while self.demands and not self.stopped:
                self.cond.wait()

    def _run_plans(self) -> None:
        """Run the latest plan, then the kept ones, in the order handed over."""
        with self.cond:
            plans = [self.pending_plan] if self.pending_plan is not None else []
            plans += self.kept_plans
            self.pending_plan = None
            self.kept_plans.clear()
        for make_forecast in plans:
            self._planned(make_forecast)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self._has_plans() and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                    entry = None if self._has_plans() else self.queue.pop()
                if entry is None:
                    self._run_plans()
                    continue
                key = entry[0]
                with self.cond:
                    self._reading_since = time.perf_counter()
                try:
                    read(self.transfer, self.tier, self.stats, key, self._between_chunks)
                finally:
                    with self.cond:
                        self.in_flight.pop(key).set()
                        self._read_s += time.perf_counter() - self._reading_since
                        self._reading_since = None
        except BaseException as exc:  # noqa: BLE001 -- handed to the decoding thread, which raises it
            with self.cond:
                self.failure = exc
                self.stopped = True
                for event in self.in_flight.values():
                    event.set()
                self.in_flight.clear()
                self.queue.clear()


def read(transfer: Transfer, tier: FastTier, stats: RuntimeStats, key: Key, between_chunks=None) -> None:
    """One prefetch read into the fast tier."""
    if key in tier:  # read on demand since it was requested
        return
    loaded = transfer.load(key, between_chunks)
    nbytes = transfer.expert_nbytes(key[0])
    if tier.put(key, loaded, nbytes, prefetch=True):
        stats.prefetch_reads += 1
        stats.bytes_read += nbytes


class SynchronousPrefetcher(_Requester):
    """The prefetcher's interface with every read made on the decoding thread, at the end of
    the layer that requested it (while that layer still holds its experts, as a background
    read overlapping its compute would): no overlap, and decisions that do not depend on
    timing. The simulator with an instant link makes the same decisions (the parity tests)."""

    def request(self, requests: list[Request]) -> None:
        added = self.queue.request(requests, self.tier.__contains__, self.tier.residency.position)
        self.stats.prefetch_requests += len(added)

    def forecast(self, forecast: Forecast) -> None:
        self._take(forecast, self.tier.__contains__)

    def plan(self, make_forecast: Plan, *, keep: bool = False) -> None:
        self._planned(make_forecast)

    def begin_layer(self, position: int, needed: set[Key]) -> None:
        self.queue.begin_layer(position, needed)

    def finish_layer(self, position: int) -> None:
        """Make the layer's requested reads, then drop what is stale."""
        while (entry := self.queue.pop()) is not None:
            read(self.transfer, self.tier, self.stats, entry[0])
        self.queue.finish_layer(position)

    def wait_for(self, key: Key) -> bool:
        self.queue.take(key)
        return False

    @contextmanager
    def demand_read(self):
        yield

    def close(self) -> None:
        self.queue.clear()
