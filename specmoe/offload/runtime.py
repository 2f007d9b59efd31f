"""Run a Hugging Face MoE model with its routed experts in a slow tier and a byte-budgeted
fast-tier cache, prefetching in the background what a predictor (or a recorded trace)
expects the next layers to need.

Each MoE block's ``experts`` submodule is swapped, on this model instance only, for an
:class:`OffloadedExperts` that fetches the experts a call needs and runs the original
module's own forward on them through ``torch.func.functional_call`` — the same code and
arithmetic as the resident model, so outputs match it for any cache size. A misprediction
costs a wasted read, never a wrong result.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from specmoe.errors import InputError
from specmoe.models.loading import LoadedModel
from specmoe.offload.cache import LFU, LRU, Belady
from specmoe.offload.expert_files import ExpertFiles

Key = tuple[int, int]


@dataclass
class RuntimeStats:
    hits: int = 0
    misses: int = 0
    late: int = 0
    """Needed while its prefetch was still reading."""
    demand_reads: int = 0
    prefetch_reads: int = 0
    wasted_prefetches: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    peak_bytes: int = 0
    prefetch_requests: int = 0

    def to_dict(self) -> dict:
        accesses = self.hits + self.misses + self.late
        return {**self.__dict__, "hit_rate": self.hits / max(accesses, 1)}


class FastTier:
    """Expert tensors in fast memory, never more than ``budget_bytes``; LRU eviction of
    experts not pinned by the running layer. Thread-safe."""

    def __init__(
        self,
        budget_bytes: int,
        stats: RuntimeStats,
        eviction: str = "lru",
        future_uses: dict[Key, list[int]] | None = None,
    ):
        self.budget = budget_bytes
        self.stats = stats
        self.entries: dict[Key, tuple[list[torch.Tensor], int]] = {}
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

    def get(self, key: Key):
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.clock += 1
                self.policy.on_use(key, self.clock)
                self.unused_prefetch.discard(key)
            return None if entry is None else entry[0]

    def get_nowait(self, key: Key):
        """Like :meth:`get` but without counting a use (for the prefetcher's checks)."""
        with self.lock:
            entry = self.entries.get(key)
            return None if entry is None else entry[0]

    def clear(self) -> None:
        """Drop everything not pinned (the on-demand floor keeps nothing between layers)."""
        with self.lock:
            for key in [k for k in self.entries if k not in self.pinned]:
                self.used -= self.entries.pop(key)[1]

    def put(self, key: Key, tensors: list[torch.Tensor], nbytes: int, *, prefetch: bool) -> bool:
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
            self.entries[key] = (tensors, nbytes)
            self.used += nbytes
            self.clock += 1
            self.policy.on_use(key, self.clock)
            if prefetch:
                self.unused_prefetch.add(key)
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            return True


class Prefetcher:
    """A background thread reading requested experts into the fast tier, in request order."""

    def __init__(self, files: ExpertFiles, tier: FastTier, stats: RuntimeStats):
        self.files, self.tier, self.stats = files, tier, stats
        self.queue: deque[Key] = deque()
        self.in_flight: dict[Key, threading.Event] = {}
        self.cond = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="specmoe-prefetch", daemon=True)
        self.thread.start()

    def request(self, keys: list[Key]) -> None:
        with self.cond:
            for key in keys:
                if key not in self.in_flight and self.tier.get_nowait(key) is None:
                    self.in_flight[key] = threading.Event()
                    self.queue.append(key)
                    self.stats.prefetch_requests += 1
            self.cond.notify()

    def wait_for(self, key: Key) -> bool:
        """Block until an in-flight prefetch of ``key`` finishes; False if none is in flight."""
        with self.cond:
            event = self.in_flight.get(key)
            if event is not None and key in self.queue:  # not started yet: the caller reads it itself
                self.queue.remove(key)
                del self.in_flight[key]
                event.set()
                return False
        if event is None:
            return False
        event.wait()
        return True

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                key = self.queue.popleft()
            tensors = self.files.read(*key)
            nbytes = self.files.expert_nbytes(key[0])
            if self.tier.put(key, tensors, nbytes, prefetch=True):
                self.stats.prefetch_reads += 1
                self.stats.bytes_read += nbytes
            with self.cond:
                self.in_flight.pop(key).set()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(timeout=5)


def fetch_expert(
    tier: FastTier, prefetcher: Prefetcher | None, files: ExpertFiles, stats: RuntimeStats, key: Key
) -> list[torch.Tensor]:
    """One expert's tensors: from the fast tier (hit), from a prefetch still reading (late),
    or read now from the slow tier (miss). Waiting and reading count as stall time."""
    tensors = tier.get(key)
    if tensors is not None:
        stats.hits += 1
        return tensors
    began = time.perf_counter()
    if prefetcher is not None and prefetcher.wait_for(key):
        tensors = tier.get(key)
        if tensors is not None:
            stats.late += 1
            stats.stall_s += time.perf_counter() - began
            return tensors
    tensors = files.read(*key)
    stats.stall_s += time.perf_counter() - began
    stats.misses += 1
    stats.demand_reads += 1
    stats.bytes_read += files.expert_nbytes(key[0])
    tier.put(key, tensors, files.expert_nbytes(key[0]), prefetch=False)
    return tensors


@dataclass
class _LayerBinding:
    layer_idx: int
    names: list[str]
    """Names of the (E, ...) expert parameters inside the experts module."""


class OffloadedExperts(nn.Module):
    """Stands in for one MoE block's ``experts`` module; the original runs on fetched weights."""

    def __init__(self, original: nn.Module, binding: _LayerBinding, runtime: OffloadRuntime):
        super().__init__()
        self.binding = binding
        self._original = (original,)  # a tuple: not a submodule, so its (emptied) params are not ours
        self._runtime = (runtime,)

    def forward(self, hidden_states, *args, **kwargs):
        runtime, original, binding = self._runtime[0], self._original[0], self.binding
        layer = runtime.layers[binding.layer_idx]
        ids, weights = runtime.loaded.adapter.selection_from_call(layer, (hidden_states, *args), kwargs)
        runtime.on_routing(binding.layer_idx, ids, weights)
        needed = sorted({int(e) for e in ids.reshape(-1).tolist() if e >= 0})
        tensors = runtime.fetch(binding.layer_idx, needed)
        # The experts run on a compact stack of just the needed experts; ids are remapped to it.
        params = {name: torch.stack([tensors[e][i] for e in needed]) for i, name in enumerate(binding.names)}
        remap = torch.full((runtime.num_experts + 1,), runtime.num_experts, dtype=torch.long)
        remap[torch.tensor(needed, dtype=torch.long)] = torch.arange(len(needed))
        if "top_k_index" in kwargs:
            kwargs = {**kwargs, "top_k_index": remap[kwargs["top_k_index"]]}
        else:
            args = (remap[args[0]],) + tuple(args[1:])
        out = functional_call(original, params, (hidden_states, *args), kwargs, strict=False)
        runtime.release(binding.layer_idx, needed)
        return out


class OffloadRuntime:
    """Offloaded execution of ``loaded`` (modified in place).

    Args:
        loaded: a model from :func:`specmoe.models.loading.load_model` (or ``wrap_model``).
        directory: where expert files are written (the slow tier).
        budget_bytes: fast-tier capacity; never exceeded.
        predictor: an :class:`ExpertPredictor` over routing (prefetch after each layer's routing).
        lookahead, budget, threshold: prefetch layers l+1..l+lookahead, at most ``budget``
            experts per layer, each with probability >= ``threshold``.
        oracle: recorded routing ``oracle[step][layer] -> list of experts`` to prefetch instead.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        directory: str | Path,
        budget_bytes: int,
        *,
        predictor=None,
        lookahead: int = 1,
        budget: int | None = None,
        threshold: float = 0.0,
        oracle=None,
    ):
        if len(loaded.stacks) != 1:
            raise InputError(
                "the offload runtime supports single-stack (decoder-only) models; "
                f"{loaded.model_id} has stacks {list(loaded.stacks)}"
            )
        meta = predictor.fitted_meta() if predictor is not None else {}
        if meta and (meta.get("num_layers"), meta.get("num_experts")) != (len(loaded.layers), loaded.num_experts):
            raise InputError(
                f"predictor {predictor.name} was fitted for {meta.get('num_layers')} MoE layers x "
                f"{meta.get('num_experts')} experts; {loaded.model_id} has {len(loaded.layers)} x "
                f"{loaded.num_experts}: train it on this model's traces"
            )
        if predictor is not None and (predictor.needs_hidden or predictor.previous_tokens):
            raise InputError(
                f"runtime prefetch uses routing-only predictors; {predictor.name} needs hidden states or earlier tokens"
            )
        self.loaded = loaded
        self.layers = loaded.layers
        self.num_experts, self.top_k = loaded.num_experts, loaded.top_k
        self.stats = RuntimeStats()
        self.predictor, self.lookahead, self.threshold, self.oracle = predictor, lookahead, threshold, oracle
        self.budget = budget or 2 * loaded.top_k
        self._bindings = [self._binding(layer) for layer in self.layers]
        self.files = self._write_experts(Path(directory))
        largest = max(self.files.expert_nbytes(i) for i in range(len(self.layers)))
        if budget_bytes < largest:
            raise InputError(f"fast-tier budget {budget_bytes} B is smaller than one expert ({largest} B)")
        self.tier = FastTier(budget_bytes, self.stats)
        self.prefetcher = Prefetcher(self.files, self.tier, self.stats) if (predictor or oracle) else None
        self.loaded.model.config._experts_implementation = "eager"
        self._swap_in()
        self.step = 0
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._token_ids = torch.zeros(0, dtype=torch.long)
        self._input_hook = loaded.model.register_forward_pre_hook(self._on_input, with_kwargs=True)

    def _on_input(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._token_ids = ids.reshape(-1).cpu()

    # --- setup ------------------------------------------------------------------------
    def _binding(self, layer) -> _LayerBinding:
        experts = getattr(layer.block, "experts", None)
        names = (
            [n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == self.num_experts]
            if experts is not None
            else []
        )
        if not names or any(p.dim() >= 2 for n, p in experts.named_parameters() if n not in names):
            raise InputError(
                f"the offload runtime supports experts stored as (num_experts, ...) tensors "
                f"(Mixtral, Qwen-MoE, OLMoE, DeepSeek, gpt-oss, PhiMoE, GraniteMoE); "
                f"{self.loaded.model_type} is not supported yet"
            )
        return _LayerBinding(layer.layer_idx, names)

    def _write_experts(self, directory: Path) -> ExpertFiles:
        per_layer = {}
        for layer, binding in zip(self.layers, self._bindings):
            params = dict(layer.block.experts.named_parameters(recurse=False))
            per_layer[layer.layer_idx] = [[params[n][e] for n in binding.names] for e in range(self.num_experts)]
        return ExpertFiles.write(directory, per_layer)

    def _swap_in(self) -> None:
        for layer, binding in zip(self.layers, self._bindings):
            original = layer.block.experts
            for name in binding.names:  # free the resident copies: the weights now live in the slow tier
                dtype = getattr(original, name).dtype
                setattr(original, name, nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))
            layer.block.experts = OffloadedExperts(original, binding, self)

    # --- per call ---------------------------------------------------------------------
    def fetch(self, layer: int, experts: list[int]) -> dict[int, list[torch.Tensor]]:
        keys = [(layer, e) for e in experts]
        with self.tier.lock:
            fits = len(keys) * self.files.expert_nbytes(layer) <= self.tier.budget
            self.tier.pinned = set(keys) if fits else set()  # a layer wider than the tier streams through it
        return {key[1]: fetch_expert(self.tier, self.prefetcher, self.files, self.stats, key) for key in keys}

    def release(self, layer: int, experts: list[int]) -> None:
        with self.tier.lock:
            self.tier.pinned = set()
        if layer == len(self.layers) - 1:
            self.step += 1

    def on_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Layer ``layer``'s routing is known: queue prefetches for the next layers."""
        if layer == 0:
            self._history = []
        self._history.append((ids, weights))
        if self.prefetcher is None:
            return
        wanted: list[Key] = []
        for h in range(1, self.lookahead + 1):
            target = layer + h
            if target >= len(self.layers):
                break
            if self.oracle is not None:
                steps = self.oracle
                if self.step < len(steps):
                    wanted += [(target, e) for e in steps[self.step][target]]
                continue
            probs = self._predict(layer)[:, h - 1]  # (N, E)
            pooled, best = probs.sum(0), probs.max(0).values
            ranked = [int(e) for e in pooled.argsort(descending=True)[: self.budget] if best[e] >= self.threshold]
            wanted += [(target, e) for e in ranked]
        self.prefetcher.request(wanted)

    def _predict(self, layer: int) -> torch.Tensor:
        from specmoe.predictors.data import IGNORE, Context

        ids = torch.stack([h[0] for h in self._history], 1)  # (N, l+1, k)
        weights = torch.stack([h[1] for h in self._history], 1)
        n = ids.shape[0]
        tokens = self._token_ids if len(self._token_ids) == n else torch.zeros(n, dtype=torch.long)
        context = Context(
            layer,
            ids,
            weights,
            tokens,
            torch.full((n, 0, len(self.layers), self.top_k), IGNORE),
            None,
            len(self.layers),
            self.num_experts,
        )
        return self.predictor.predict_proba(context)

    def close(self) -> None:
        self._input_hook.remove()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.files.close()
