"""Where offloaded experts live (the slow tier) and how they reach the device that runs them.

Two configurations are supported:

- **disk → RAM** (any machine): :class:`~specmoe.offload.live.expert_files.ExpertFiles`, read
  with the page cache bypassed into fresh host tensors, which the fast tier keeps as they are.
- **host → GPU**: :class:`HostExperts` in pinned host memory, copied to the GPU on a CUDA
  stream of their own so that copies overlap the layers computing on the default stream.
  The compute stream waits for a copy's event only when it needs that expert.

``HostExperts`` with ``device="cpu"`` is the same code path with the copy done by
``clone``: it exists so the logic is tested on machines without a GPU, not for speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from specmoe.offload import Key


class SlowTier(Protocol):
    fresh_reads: bool
    """Whether ``read`` returns new tensors (True) or the stored ones, which must be copied."""

    def read(self, layer: int, expert: int, between_chunks: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """The expert's tensors; a tier that reads in pieces calls ``between_chunks`` between
        them, so that the caller may hold a read back while a more urgent one runs."""

    def expert_nbytes(self, layer: int) -> int: ...

    def reserve_buffers(self, experts: int) -> None:
        """Prepare to hold ``experts`` read experts at once (a no-op where reads allocate nothing)."""

    def close(self) -> None: ...


class HostExperts:
    """Experts held in host memory, pinned when a GPU will copy from them (page-locked
    memory is what lets a host-to-device copy run asynchronously)."""

    fresh_reads = False
    """``read`` hands out the stored tensors themselves, not copies."""

    def __init__(self, layers: dict[int, list[list[torch.Tensor]]], *, pin: bool = False):
        self.experts: dict[int, list[list[torch.Tensor]]] = {}
        for layer, experts in layers.items():
            stored, previous, copy = [], None, None
            for tensors in experts:
                if tensors is not previous:  # the same tensors repeated are stored once
                    copy = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]
                    copy = [t.pin_memory() for t in copy] if pin else copy
                    previous = tensors
                stored.append(copy)
            self.experts[layer] = stored

    def read(self, layer: int, expert: int, between_chunks=None) -> list[torch.Tensor]:
        return self.experts[layer][expert]  # nothing to read: a copy is queued on a stream

    def reserve_buffers(self, experts: int) -> None:
        pass  # reads hand out the stored tensors; the copies' memory is the device allocator's

    def expert_nbytes(self, layer: int) -> int:
        return sum(t.numel() * t.element_size() for t in self.experts[layer][0])

    def close(self) -> None:
        self.experts.clear()


@dataclass
class Loaded:
    """An expert's tensors on the fast device; ``ready`` is the CUDA event its copy records."""

    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None = None

    def in_flight(self) -> bool:
        return self.ready is not None and not self.ready.query()

    def wait_host(self) -> None:
        """Block this thread until the copy has landed."""
        if self.ready is not None:
            self.ready.synchronize()

    def for_compute(self) -> list[torch.Tensor]:
        """The tensors, safe to use on the current stream: it waits for the copy (on the GPU,
        without blocking the host), and the allocator is told not to reuse their memory
        before that stream is done with them, even if the cache evicts them meanwhile."""
        if self.ready is not None:
            stream = torch.cuda.current_stream(self.tensors[0].device)
            stream.wait_event(self.ready)
            for t in self.tensors:
                t.record_stream(stream)
        return self.tensors


class Transfer:
    """Copies experts from a slow tier to ``device``; on CUDA, on dedicated streams: one for
    prefetches and a higher-priority one for demand loads, so that a demand copy does not
    queue behind prefetch copies already issued (the GPU's form of "a demand load goes
    first"; on disk the prefetcher pauses instead)."""

    def __init__(self, slow: SlowTier, device: str | torch.device = "cpu"):
        self.slow = slow
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the fast tier must be on cpu or cuda, got {self.device}")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.demand_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None

    def expert_nbytes(self, layer: int) -> int:
        return self.slow.expert_nbytes(layer)

    def load(self, key: Key, between_chunks: Callable[[], None] | None = None, *, demand: bool = False) -> Loaded:
        host = self.slow.read(*key, between_chunks)
        if self.stream is None:
            return Loaded(host if self.slow.fresh_reads else [t.clone() for t in host])
        stream = self.demand_stream if demand else self.stream
        with torch.cuda.stream(stream):
            tensors = [t.to(self.device, non_blocking=True) for t in host]
            ready = torch.cuda.Event()
            ready.record(stream)
        return Loaded(tensors, ready)

    def close(self) -> None:
        for stream in (self.stream, self.demand_stream):
            if stream is not None:
                stream.synchronize()
        self.slow.close()


class HostCache:
    """The middle of three tiers (disk -> host memory -> GPU), for when host memory cannot
    hold every expert either: a byte-budgeted cache of experts in host memory (pinned, for a
    GPU to copy from asynchronously) in front of ``inner``, evicting the least recently read.
    On a CPU-only machine the same code runs with the fast tier in host memory too (a
    stand-in, for tests: it buys nothing there)."""

    fresh_reads = False
    """Hands out its own copies, which the transfer to the fast tier copies again."""

    def __init__(self, inner: SlowTier, budget_bytes: int, *, pin: bool = False):
        from collections import OrderedDict
        from threading import Lock

        self.inner, self.budget, self.pin = inner, budget_bytes, pin
        self.entries: OrderedDict[Key, list[torch.Tensor]] = OrderedDict()
        self.used = self.peak = self.hits = self.misses = 0
        self._lock = Lock()

    def read(self, layer: int, expert: int, between_chunks=None) -> list[torch.Tensor]:
        key = (layer, expert)
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                return self.entries[key]
        tensors = [t.clone() for t in self.inner.read(layer, expert, between_chunks)]  # out of the reader's buffer
        tensors = [t.pin_memory() for t in tensors] if self.pin else tensors
        nbytes = self.inner.expert_nbytes(layer)
        with self._lock:
            self.misses += 1
            while self.used + nbytes > self.budget and self.entries:
                _, evicted = self.entries.popitem(last=False)
                self.used -= sum(t.numel() * t.element_size() for t in evicted)
            self.entries[key] = tensors
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        return tensors

    def expert_nbytes(self, layer: int) -> int:
        return self.inner.expert_nbytes(layer)

    def reserve_buffers(self, experts: int) -> None:
        self.inner.reserve_buffers(2)  # the cache keeps copies: only reads in flight use the reader's buffers

    def stats(self) -> dict:
        reads = self.hits + self.misses
        return {"host_cache_hit_rate": self.hits / reads if reads else None, "host_cache_peak_bytes": self.peak}

    def close(self) -> None:
        self.entries.clear()
        self.inner.close()
