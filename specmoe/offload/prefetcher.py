"""The background thread of the measured fast tier: it plans prefetches and reads them."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

from specmoe.offload.fast_tier import FastTier, RuntimeStats
from specmoe.offload.tiers import Key, Transfer


class Prefetcher:
    """A background thread that plans prefetches and loads them into the fast tier, in
    request order.

    Planning runs here, not on the decoding thread (:meth:`plan`): the decoder hands over a
    plan and goes on computing, and a plan not yet started when a newer one arrives is
    dropped (the newer one has seen more routing, and the older one's nearest layer is
    already running), unless it was handed over with ``keep=True`` (a plan for the next
    token, which no later plan of this token covers). Plans run before the next read and
    between a read's chunks, so a plan waits for at most one chunk.

    A demand read goes first: while one runs (:meth:`demand_read`), a prefetch read pauses
    at its next chunk boundary. (The simulator's link lets a demand load overtake queued
    prefetches but not one under way; pausing mid-read goes a step further.) The decoder
    runs one read at a time, so while it waits for a prefetch no demand read holds that
    prefetch back.

    If planning or a read fails on the thread, the thread stops and the decoder's next call
    raises the failure, rather than waiting for a read that will never come."""

    def __init__(self, transfer: Transfer, tier: FastTier, stats: RuntimeStats):
        self.transfer, self.tier, self.stats = transfer, tier, stats
        self.queue: deque[Key] = deque()
        self.in_flight: dict[Key, threading.Event] = {}
        self.cond = threading.Condition()
        self.stopped = False
        self.failure: BaseException | None = None
        self.demands = 0
        self.pending_plan: Callable[[], list[Key]] | None = None
        self.kept_plans: deque[Callable[[], list[Key]]] = deque()
        self.thread = threading.Thread(target=self._run, name="specmoe-prefetch", daemon=True)
        self.thread.start()

    def request(self, keys: list[Key]) -> None:
        with self.cond:
            self._raise_failure()
            for key in keys:
                if key not in self.in_flight and key not in self.tier:
                    self.in_flight[key] = threading.Event()
                    self.queue.append(key)
                    self.stats.prefetch_requests += 1
            self.cond.notify_all()

    def plan(self, make_keys: Callable[[], list[Key]], *, keep: bool = False) -> None:
        """Call ``make_keys`` on the prefetch thread and request what it returns; unless
        ``keep``, a newer plan replaces it if it has not started."""
        with self.cond:
            self._raise_failure()
            if keep:
                self.kept_plans.append(make_keys)
            else:
                self.pending_plan = make_keys
            self.cond.notify_all()

    def drop_stale(self, layer: int, needed: set[Key] = frozenset()) -> None:
        """``layer``'s routing is known (``needed``: what it uses) or it has run (nothing):
        requests for it not yet started, and not needed, would only waste reads."""
        with self.cond:
            for key in [k for k in self.queue if k[0] == layer and k not in needed]:
                self.queue.remove(key)
                self.in_flight.pop(key).set()

    def wait_for(self, key: Key) -> bool:
        """Block until an in-flight prefetch of ``key`` finishes; False if none is in flight."""
        with self.cond:
            self._raise_failure()
            event = self.in_flight.get(key)
            if event is not None and key in self.queue:  # not started yet: the caller loads it itself
                self.queue.remove(key)
                del self.in_flight[key]
                event.set()
                return False
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

    def _has_plans(self) -> bool:
        return self.pending_plan is not None or bool(self.kept_plans)

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise RuntimeError(f"the prefetch thread failed: {self.failure!r}") from self.failure

    def _between_chunks(self) -> None:
        self._run_plan()
        with self.cond:
            if self.demands and not self.stopped:
                self.stats.prefetch_pauses += 1
            while self.demands and not self.stopped:
                self.cond.wait()

    def _run_plan(self) -> None:
        """Run the latest plan, then the kept ones, in the order handed over."""
        with self.cond:
            plans = [self.pending_plan] if self.pending_plan is not None else []
            plans += self.kept_plans
            self.pending_plan = None
            self.kept_plans.clear()
        for make_keys in plans:
            began, began_cpu = time.perf_counter(), time.thread_time()
            keys = make_keys()
            self.stats.plan_s += time.perf_counter() - began
            self.stats.plan_cpu_s += time.thread_time() - began_cpu
            self.request(keys)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self._has_plans() and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                    key = None if self._has_plans() else self.queue.popleft()
                if key is None:
                    self._run_plan()
                    continue
                try:
                    loaded = self.transfer.load(key, self._between_chunks)
                    nbytes = self.transfer.expert_nbytes(key[0])
                    if self.tier.put(key, loaded, nbytes, prefetch=True):
                        self.stats.prefetch_reads += 1
                        self.stats.bytes_read += nbytes
                finally:
                    with self.cond:
                        self.in_flight.pop(key).set()
        except BaseException as exc:  # noqa: BLE001 -- handed to the decoding thread, which raises it
            with self.cond:
                self.failure = exc
                self.stopped = True
                for event in self.in_flight.values():
                    event.set()
                self.in_flight.clear()
                self.queue.clear()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=5)
