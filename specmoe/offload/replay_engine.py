"""Measured (not simulated) offloading with real routing and experts of a real model's size.

The built-in models' experts are kilobytes, too small for transfer cost to matter on a CPU
machine. This engine replays routing recorded from a real model (the built-in one) while
loading experts of a chosen real shape (random bf16 weights, on disk with the page cache
bypassed, or in pinned host memory for a GPU) and computing, in bf16, each expert's SwiGLU
FFN on one token, plus per layer a dense matmul the size of an attention block's four
projections standing in for the non-expert compute (attention over a KV cache is not
modelled). Transfers, prefetching and compute are real; the weights' values and the
non-expert part of the model are not. Numbers from here say so.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specmoe.offload.cache import future_uses
from specmoe.offload.expert_files import ExpertFiles
from specmoe.offload.fast_tier import (
    FastTier,
    RuntimeStats,
    fetch_expert,
    finish_layer,
)
from specmoe.offload.next_token import NextTokenPlanner
from specmoe.offload.planner import PrefetchPlanner
from specmoe.offload.prefetcher import Prefetcher
from specmoe.offload.simulator import oracle_reach
from specmoe.offload.tiers import HostExperts, SlowTier, Transfer

PLANNING = ("background", "inline")


def random_experts(
    slow_tier: str, num_layers: int, num_experts: int, hidden: int, ffn: int, *, directory: Path | None, seed: int = 0
) -> SlowTier:
    """Random bf16 SwiGLU experts, gate_up (2F, D) and down (D, F) each, in a ``disk`` or
    pinned ``host`` slow tier. One random set per layer serves all its experts (drawing
    gigabytes of random numbers would take longer than the benchmark); on disk every expert
    still has its own place and is read separately, uncached; in host memory every expert's
    copy to the GPU is a full copy."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for layer in range(num_layers):
        shared = [
            (torch.randn(2 * ffn, hidden, generator=generator) * hidden**-0.5).bfloat16(),
            (torch.randn(hidden, ffn, generator=generator) * ffn**-0.5).bfloat16(),
        ]
        layers[layer] = [shared] * num_experts
    if slow_tier == "disk":
        return ExpertFiles.write(directory, layers)
    return HostExperts(layers, pin=torch.cuda.is_available())


@dataclass
class ReplayResult:
    policy: str
    predictor: str | None
    budget_bytes: int
    tokens: int
    seconds: float
    stats: dict
    eviction: str = "lru"
    planning: str | None = None
    """Where its plans ran (prefetch runs only): ``background`` or ``inline``."""

    def row(self, cache_fraction: float) -> dict:
        return {
            "policy": self.policy,
            "predictor": self.predictor,
            "eviction": self.eviction,
            "planning": self.planning,
            "cache_fraction": cache_fraction,
            "budget_bytes": self.budget_bytes,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": self.tokens / self.seconds,
            "time_per_token_ms": 1e3 * self.seconds / self.tokens,
            "stall_fraction": self.stats["stall_s"] / self.seconds,
            "stall_ms_per_token_by_layer": [
                round(1e3 * s / self.tokens, 3) for s in self.stats.get("stall_s_by_layer", [])
            ],
            "predictor_fraction": self.stats["predict_s"] / self.seconds,
            "predictor_cpu_fraction": self.stats["predict_cpu_s"] / self.seconds,
            "predictor_background_cpu_fraction": self.stats["plan_cpu_s"] / self.seconds,
            "plan_memo_hit_rate": self.stats.get("plan_memo_hit_rate"),
            "next_token_guess_accuracy": self.stats.get("next_token_guess_accuracy"),
            "hit_rate": self.stats["hit_rate"],
            "late_prefetches": self.stats["late"],
            "demand_reads": self.stats["demand_reads"],
            "bytes_read": self.stats["bytes_read"],
            "wasted_prefetch_bytes": self.stats["wasted_prefetches"] * self.stats.get("expert_bytes", 0),
            "peak_fast_tier_bytes": self.stats["peak_bytes"],
            "simulated": False,
            "weights": "random, real shape",
        }


def replay(
    slow: SlowTier,
    routing: np.ndarray,
    gate_weights: np.ndarray,
    token_ids: np.ndarray,
    *,
    policy: str,
    budget_bytes: int,
    predictor=None,
    lookahead: int = 1,
    budget: int = 2,
    threshold: float = 0.0,
    num_experts: int,
    eviction: str = "lru",
    device: str = "cpu",
    warmup: int = 0,
    oracle_lookahead: int | None = None,
    planning: str = "background",
    next_token: NextTokenPlanner | None = None,
    residuals: torch.Tensor | None = None,
    states: torch.Tensor | None = None,
) -> ReplayResult:
    """Decode ``routing`` (T tokens, L layers, k) one token at a time on ``device``. The first
    ``warmup`` tokens fill the cache and are neither timed nor counted.

    A predictor prefetches layers l+1..l+``lookahead`` of the token it has seen routed (what
    a predictor predicts). The oracle reads the recorded future ``oracle_lookahead`` layers
    ahead in decode order (default: ``lookahead``), past the token's last layer into the next
    token's, up to L-1 layers, since on a slow disk one read outlasts several layers'
    compute. L-1 is the limit because a prefetch is keyed by layer and expires when its
    layer next runs, which is then its own token.

    A predictor that reads hidden states gets them from ``states`` (T, L, D), recorded, of
    its kind (``predictor.needs_hidden``), and plans when they exist: a router input at the
    layer's routing, a residual output once the layer has run. ``next_token`` (with
    ``policy="prefetch"``): once its guess layer has run, also prefetch the next token's
    first layers from a guess made from ``residuals`` (T, D), the recorded residual stream
    after that layer.

    ``planning``: ``background`` hands each plan to the prefetch thread (what the runtime
    does); ``inline`` plans on the decoding thread, to measure what that costs."""
    tokens, layers, _ = routing.shape
    if planning not in PLANNING:
        raise ValueError(f"planning must be one of {PLANNING}, got {planning!r}")
    if not 0 <= warmup < tokens:
        raise ValueError(f"warmup must be in [0, {tokens}) for {tokens} tokens, got {warmup}")
    if next_token is not None and (policy != "prefetch" or residuals is None or len(residuals) != tokens):
        raise ValueError("next_token needs policy 'prefetch' and the guess layer's residuals of every token")
    needs = getattr(predictor, "needs_hidden", None) if policy == "prefetch" else None
    if needs and (states is None or tuple(states.shape[:2]) != (tokens, layers)):
        raise ValueError(
            f"predictor {predictor.name} reads {needs} states: pass states of shape ({tokens}, {layers}, D)"
        )
    states = states if needs else None
    plan_after_output = needs == "residual_out"
    if policy == "oracle":
        default = min(lookahead, max(layers - 1, 1))  # a predictor's lookahead stops at the token's end
        oracle_lookahead = oracle_reach(layers, default if oracle_lookahead is None else oracle_lookahead)
    stats = RuntimeStats()
    future = future_uses(routing, layers) if eviction == "belady" else None
    transfer = Transfer(slow, device)
    tier = FastTier(budget_bytes, stats, eviction, future, layers)
    prefetcher = Prefetcher(transfer, tier, stats) if policy in ("prefetch", "oracle") else None
    hidden = slow.read(0, 0)[0].shape[1]
    dense = _dense_stand_in(hidden, transfer.device)

    planner = (
        PrefetchPlanner(predictor, layers, num_experts, lookahead, budget, threshold) if policy == "prefetch" else None
    )
    # Converted once: a predictor sees token t's routing up to the current layer.
    expert_ids, weights = routing.astype(np.int64), gate_weights.astype(np.float32)
    token_ids = token_ids.astype(np.int64)

    def oracle_keys(t: int, layer: int) -> list[tuple[int, int]]:
        now = t * layers + layer  # position in decode order
        ahead = range(now + 1, min(now + 1 + oracle_lookahead, tokens * layers))
        return [(p % layers, int(e)) for p in ahead for e in routing[p // layers, p % layers] if e >= 0]

    guessed = {"made": 0, "right": 0}  # for timed tokens only

    def plan(t: int, layer: int) -> list[tuple[int, int]]:
        return planner.plan(
            layer,
            expert_ids[t : t + 1, : layer + 1],
            weights[t : t + 1, : layer + 1],
            token_ids[t : t + 1],
            hidden=None if states is None else states[t : t + 1, : layer + 1],
        )

    def guess_plan(t: int, ids: np.ndarray, probs: np.ndarray) -> list[tuple[int, int]]:
        # a plan run late keeps only the layers token t+1 has not reached
        return [key for key in next_token.plan(ids, probs) if (t + 1) * layers + key[0] > tier.position]

    # What prediction costs the decoding thread: handing a plan over, or (inline) planning,
    # and the next-token guess.
    # Wall time includes waiting for a core or the GIL; CPU time is the thread's own work.
    # Planning on the prefetch thread is counted there (stats plan_s, plan_cpu_s).
    predict_s = predict_cpu_s = 0.0

    def submit(make_keys, keep: bool = False, t: int | None = None) -> None:
        """Hand a plan over; with ``t``, guess token t+1 here first (the guess's cost counts
        as the decoding thread's)."""
        nonlocal predict_s, predict_cpu_s
        began, began_cpu = time.perf_counter(), time.thread_time()
        if t is not None:
            ids, probs = next_token.guess(residuals[t : t + 1])
            make_keys = functools.partial(make_keys, t, ids, probs)
            if t >= warmup:
                guessed["made"] += 1
                guessed["right"] += int(ids[0, 0]) == token_ids[t + 1]
        if planning == "inline":
            prefetcher.request(make_keys())
        else:
            prefetcher.plan(make_keys, keep=keep)
        predict_s += time.perf_counter() - began
        predict_cpu_s += time.thread_time() - began_cpu

    x = torch.randn(1, hidden, device=transfer.device).bfloat16()
    start = time.perf_counter()
    try:
        for t in range(tokens):
            if t == warmup:
                _synchronize(transfer.device)
                stats.__init__()  # counters restart; the cache keeps what warm-up put there
                predict_s = predict_cpu_s = 0.0
                if planner is not None:  # like the cache, the memo keeps what warm-up put there
                    planner.hits = planner.misses = 0
                start = time.perf_counter()
            for layer in range(layers):
                needed = sorted({int(e) for e in routing[t, layer] if e >= 0})
                tier.position = t * layers + layer
                if policy == "oracle":
                    prefetcher.request(oracle_keys(t, layer))
                elif policy == "prefetch" and not plan_after_output:  # the layer's routing is known
                    submit(functools.partial(plan, t, layer))
                keys = [(layer, e) for e in needed]
                with tier.lock:
                    tier.pinned = set(keys)
                if prefetcher is not None:
                    prefetcher.drop_stale(layer, set(keys))
                x = _layer(x, dense, (fetch_expert(tier, prefetcher, transfer, stats, key) for key in keys))
                # the layer's output is known: what reads it plans now
                if policy == "prefetch" and plan_after_output:
                    submit(functools.partial(plan, t, layer))
                finish_layer(tier, prefetcher, layer)
                if next_token is not None and layer == next_token.guess_layer and t + 1 < tokens:
                    submit(guess_plan, keep=True, t=t)  # kept: no later plan of t covers t+1
                if policy == "on-demand":
                    tier.clear()
        _synchronize(transfer.device)
    finally:
        if prefetcher is not None:
            prefetcher.close()
    seconds = time.perf_counter() - start
    result = stats.to_dict() | {
        "expert_bytes": slow.expert_nbytes(0),
        "predict_s": predict_s,
        "predict_cpu_s": predict_cpu_s,
        **(planner.stats() if planner is not None else {}),
    }
    if next_token is not None:  # how often the guess named the token that came next
        result["next_token_guesses"] = guessed["made"]
        result["next_token_guess_accuracy"] = guessed["right"] / guessed["made"] if guessed["made"] else None
    return ReplayResult(
        policy, getattr(predictor, "name", None), budget_bytes, tokens - warmup, seconds, result, eviction
    )


def _layer(x: torch.Tensor, dense: torch.Tensor, experts) -> torch.Tensor:
    """One layer of the stand-in model: the attention-sized dense matmul, then each expert's
    SwiGLU FFN (its (gate_up, down) pair, fetched as the loop reaches it) on the token."""
    hidden = x.shape[-1]
    x = x + torch.nn.functional.linear(x, dense).view(4, 1, hidden).sum(0)
    out = torch.zeros_like(x)
    for gate_up, down in experts:
        gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
        out += torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)
    return torch.nn.functional.normalize((x + out).float(), dim=-1).bfloat16() * hidden**0.5


def _dense_stand_in(hidden: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(4 * hidden, hidden, generator=generator) * hidden**-0.5).bfloat16().to(device)


def interference(slow: SlowTier, num_layers: int, num_experts: int, device: str = "cpu", *, layers: int = 300) -> dict:
    """Whether loading and computing overlap on this machine, which bounds what any
    prefetcher can hide: an expert's load time and a stand-in layer's compute time, each
    alone, then both while a second thread loads experts without pause as the first
    computes. Every load reads an expert not read before in the probe (a re-read could come
    from a cache below the page cache, such as a virtual disk's host). Where a read needs
    the CPU (a virtual disk on a small machine) or the memory bus, the two slow each other
    down, and the probe shows by how much."""
    transfer = Transfer(slow, device)
    order = np.random.default_rng(0).permutation(num_layers * num_experts)
    keys = iter([(int(i) // num_experts, int(i) % num_experts) for i in order])
    hidden = slow.read(0, 0)[0].shape[1]
    dense = _dense_stand_in(hidden, transfer.device)
    # Decoding computes a different expert at every layer, streamed from memory; one expert
    # computed over and over would sit in the CPU's cache and hide the memory traffic.
    experts = [transfer.load(next(keys)).for_compute() for _ in range(min(16, len(order) // 4))]
    x = torch.randn(1, hidden, device=transfer.device).bfloat16()

    def compute_ms() -> float:
        _layer(x, dense, experts[:1])
        _synchronize(transfer.device)
        began = time.perf_counter()
        for i in range(layers):
            _layer(x, dense, [experts[i % len(experts)]])
        _synchronize(transfer.device)
        return 1e3 * (time.perf_counter() - began) / layers

    def load_ms() -> float | None:
        key = next(keys, None)
        if key is None:
            return None
        began = time.perf_counter()
        transfer.load(key).wait_host()
        return 1e3 * (time.perf_counter() - began)

    alone = compute_ms()
    reads = [load_ms() for _ in range(min(8, len(order) // 4))]
    stop, running, busy_reads = threading.Event(), threading.Event(), []

    def loader() -> None:
        while not stop.is_set():
            took = load_ms()
            if took is None:
                break
            busy_reads.append(took)
            running.set()

    thread = threading.Thread(target=loader, daemon=True)
    thread.start()
    try:
        running.wait(timeout=60)  # timed from the loader's second load on, not from its start-up
        busy = compute_ms()
    finally:
        stop.set()
        thread.join()
    return {
        "expert_load_ms": round(float(np.median(reads)), 3),
        "expert_load_ms_while_computing": round(float(np.median(busy_reads[1:] or busy_reads)), 3)
        if busy_reads
        else None,
        "layer_compute_ms": round(alone, 3),
        "layer_compute_ms_while_loading": round(busy, 3),
        "loads_while_computing": len(busy_reads) - 1,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
