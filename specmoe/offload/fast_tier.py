"""The measured fast tier shared by the runtime and the replay benchmark: a byte-budgeted
expert cache, a background prefetcher, and the demand path that falls back to the slow tier.

Stall time is host time spent waiting for an expert: a demand read, or a prefetch still in
flight (on a GPU, its copy event is waited on so the stall is seen, not hidden in the stream).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from specmoe.offload.cache import LFU, LRU, Belady, expire_prefetches
from specmoe.offload.tiers import Key, Loaded, Transfer

EVICTIONS = ("lru", "lfu", "belady")


@dataclass
class RuntimeStats:
    hits: int = 0
    misses: int = 0
    late: int = 0
    """Needed while its prefetch was still reading or copying."""
    demand_reads: int = 0
    prefetch_reads: int = 0
    wasted_prefetches: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    peak_bytes: int = 0
    prefetch_requests: int = 0
    prefetch_pauses: int = 0
    """Times a prefetch read held back, between two chunks, for a demand read."""
    plan_s: float = 0.0
    plan_cpu_s: float = 0.0
    """Wall and CPU time of planning on the prefetch thread (off the decoding path)."""

    def to_dict(self) -> dict:
        accesses = self.hits + self.misses + self.late
        return {**self.__dict__, "hit_rate": self.hits / max(accesses, 1)}


class FastTier:
    """Expert tensors in fast memory, never more than ``budget_bytes``; experts pinned by the
    running layer are never evicted. Thread-safe."""

    def __init__(
        self,
        budget_bytes: int,
        stats: RuntimeStats,
        eviction: str = "lru",
        future_uses: dict[Key, list[int]] | None = None,
    ):
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        self.budget = budget_bytes
        self.stats = stats
        self.entries: dict[Key, tuple[Loaded, int]] = {}
        self.used = 0
        self.pinned: set[Key] = set()
        self.unused_prefetch: set[Key] = set()
        if eviction == "belady":
            if future_uses is None:
                raise ValueError("Belady eviction needs the future: pass future_uses")
            self.policy = Belady(future_uses)
        else:
            self.policy = {"lru": LRU, "lfu": LFU}[eviction]()
        self.position = 0
        """Where decoding is (step * layers + layer); Belady measures next uses from here."""
        self.clock = 0
        self.lock = threading.RLock()

    def get(self, key: Key) -> Loaded | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.clock += 1
                self.policy.on_use(key, self.clock)
                self.unused_prefetch.discard(key)
            return None if entry is None else entry[0]

    def __contains__(self, key: Key) -> bool:
        """Presence without counting a use (for the prefetcher's checks)."""
        with self.lock:
            return key in self.entries

    def clear(self) -> None:
        """Drop everything not pinned (the on-demand floor keeps nothing between layers)."""
        with self.lock:
            for key in [k for k in self.entries if k not in self.pinned]:
                self.used -= self.entries.pop(key)[1]

    def expire(self, layer: int) -> None:
        """``layer`` has run: its unused prefetches go first when room is needed."""
        with self.lock:
            expire_prefetches(self.policy, self.unused_prefetch, layer)

    def put(self, key: Key, loaded: Loaded, nbytes: int, *, prefetch: bool) -> bool:
        with self.lock:
            if key in self.entries:
                return True
            while self.used + nbytes > self.budget:
                candidates = [k for k in self.entries if k not in self.pinned]
                if not candidates:
                    return False
                now = self.position if isinstance(self.policy, Belady) else self.clock
                victim = self.policy.victim(candidates, now)
                self.used -= self.entries.pop(victim)[1]
                if victim in self.unused_prefetch:
                    self.unused_prefetch.discard(victim)
                    self.stats.wasted_prefetches += 1
            self.entries[key] = (loaded, nbytes)
            self.used += nbytes
            self.clock += 1
            if prefetch:
                self.policy.on_insert(key, self.clock)
                self.unused_prefetch.add(key)
            else:
                self.policy.on_use(key, self.clock)
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            return True


class Prefetcher:
    """A background thread that plans prefetches and loads them into the fast tier, in
    request order.

    Planning runs here, not on the decoding thread (:meth:`plan`): the decoder hands over a
    plan and goes on computing, and a plan not yet started when a newer one arrives is
    dropped (the newer one has seen more routing, and the older one's nearest layer is
    already running). Plans run before the next read and between a read's chunks, so a plan
    waits for at most one chunk.

    A demand read goes first: while one runs (:meth:`demand_read`), a prefetch read pauses
    at its next chunk boundary, as the simulator's shared transfer queue lets a demand load
    overtake queued prefetches. (The decoder runs one read at a time: while it waits for a
    prefetch, no demand read holds that prefetch back.)

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

    def plan(self, make_keys: Callable[[], list[Key]]) -> None:
        """Call ``make_keys`` on the prefetch thread and request what it returns."""
        with self.cond:
            self._raise_failure()
            self.pending_plan = make_keys
            self.cond.notify_all()

    def drop_stale(self, layer: int) -> None:
        """``layer`` has run: requests for it not yet started would only waste reads."""
        with self.cond:
            for key in [k for k in self.queue if k[0] == layer]:
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
        with self.cond:
            make_keys, self.pending_plan = self.pending_plan, None
        if make_keys is not None:
            began, began_cpu = time.perf_counter(), time.thread_time()
            keys = make_keys()
            self.stats.plan_s += time.perf_counter() - began
            self.stats.plan_cpu_s += time.thread_time() - began_cpu
            self.request(keys)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and self.pending_plan is None and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                    key = self.queue.popleft() if self.pending_plan is None else None
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


def finish_layer(tier: FastTier, prefetcher: Prefetcher | None, layer: int) -> None:
    """``layer`` has computed: unpin its experts; its unused prefetches become the first
    victims and its prefetches not yet started are dropped."""
    with tier.lock:
        tier.pinned = set()
        tier.expire(layer)
    if prefetcher is not None:
        prefetcher.drop_stale(layer)


def fetch_expert(
    tier: FastTier, prefetcher: Prefetcher | None, transfer: Transfer, stats: RuntimeStats, key: Key
) -> list:
    """One expert's tensors, ready for the current stream: from the fast tier (hit), from a
    prefetch still loading (late), or loaded now from the slow tier (miss)."""
    began = time.perf_counter()
    loaded = tier.get(key)
    if loaded is None and prefetcher is not None and prefetcher.wait_for(key):
        loaded = tier.get(key)
        if loaded is not None:
            stats.late += 1
            loaded.wait_host()
            stats.stall_s += time.perf_counter() - began
            return loaded.for_compute()
    if loaded is not None:
        if loaded.in_flight():  # a GPU copy queued by the prefetcher has not landed yet
            stats.late += 1
            loaded.wait_host()
            stats.stall_s += time.perf_counter() - began
        else:
            stats.hits += 1
        return loaded.for_compute()
    nbytes = transfer.expert_nbytes(key[0])
    with prefetcher.demand_read() if prefetcher is not None else nullcontext():
        loaded = transfer.load(key, demand=True)
        loaded.wait_host()
    stats.stall_s += time.perf_counter() - began
    stats.misses += 1
    stats.demand_reads += 1
    stats.bytes_read += nbytes
    tier.put(key, loaded, nbytes, prefetch=False)
    return loaded.for_compute()
