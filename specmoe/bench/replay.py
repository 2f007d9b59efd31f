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

from specmoe.offload.eviction import future_uses
from specmoe.offload.live.expert_files import ExpertFiles
from specmoe.offload.live.next_token import NextTokenPlanner
from specmoe.offload.live.planner import PrefetchPlanner
from specmoe.offload.live.session import DecodingSession
from specmoe.offload.live.tiers import HostExperts, SlowTier, Transfer
from specmoe.offload.policy import (
    EventLog,
    PrefetchSettings,
    Request,
    in_token_requests,
    oracle_requests,
    policy_named,
)


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
            "wasted_prefetch_bytes": self.stats["wasted_prefetch_bytes"],
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
    num_experts: int,
    prefetch: PrefetchSettings | None = None,
    predictor=None,
    device: str = "cpu",
    warmup: int = 0,
    planning: str = "background",
    next_token: NextTokenPlanner | None = None,
    residuals: torch.Tensor | None = None,
    states: torch.Tensor | None = None,
    log: EventLog | None = None,
) -> ReplayResult:
    """Decode ``routing`` (T tokens, L layers, k) one token at a time on ``device`` under the
    named ``policy`` (:data:`~specmoe.offload.policy.POLICIES`), taking each layer's steps in
    the order the model runtime takes them (:class:`DecodingSession`). The first ``warmup``
    tokens fill the cache and are neither timed nor counted.

    A predictor prefetches layers l+1..l+``layers_ahead`` of the token it has seen routed.
    The oracle reads the recorded future ``prefetch.oracle_reach`` layers ahead in decode
    order (default L-1), into the next token's layers, since on a slow disk one read
    outlasts several layers' compute.

    A predictor that reads hidden states gets them from ``states`` (T, L, D), recorded, of
    its kind (``predictor.needs_hidden``): a router input at the layer's routing, a residual
    output once the layer has run. ``next_token`` (with ``prefetch+next-token``): once its
    guess layer has run, also prefetch the next token's first layers from a guess made from
    ``residuals`` (T, D), the recorded residual stream after that layer."""
    tokens, layers, top_k = routing.shape
    rule = policy_named(policy)
    if not 0 <= warmup < tokens:
        raise ValueError(f"warmup must be in [0, {tokens}) for {tokens} tokens, got {warmup}")
    if rule.next_token != (next_token is not None):
        raise ValueError(f"policy {policy!r} {'needs' if rule.next_token else 'takes no'} next_token")
    if next_token is not None and (residuals is None or len(residuals) != tokens):
        raise ValueError("next_token needs the guess layer's residuals of every token")
    if rule.prefetch == "predictor" and predictor is None:
        raise ValueError(f"policy {policy!r} needs a predictor")
    needs = getattr(predictor, "needs_hidden", None) if rule.prefetch == "predictor" else None
    if needs and (states is None or tuple(states.shape[:2]) != (tokens, layers)):
        raise ValueError(
            f"predictor {predictor.name} reads {needs} states: pass states of shape ({tokens}, {layers}, D)"
        )
    prefetch = (prefetch or PrefetchSettings()).resolve(top_k=top_k, num_layers=layers)
    eviction = rule.eviction_for(prefetch)
    transfer = Transfer(slow, device)
    session = DecodingSession(
        transfer,
        budget_bytes,
        num_layers=layers,
        eviction=eviction,
        prefetching=rule.prefetch != "none",
        keeps_experts=rule.keeps_experts,
        planning=planning,
        future_uses=future_uses(routing, layers) if eviction == "belady" else None,
        log=log,
    )
    planner = PrefetchPlanner(predictor, layers, num_experts, prefetch) if rule.prefetch == "predictor" else None
    hidden = slow.read(0, 0)[0].shape[1]
    dense = _dense_stand_in(hidden, transfer.device)
    # Converted once: a predictor sees token t's routing up to the current layer.
    expert_ids, weights = routing.astype(np.int64), gate_weights.astype(np.float32)
    token_ids = token_ids.astype(np.int64)
    states = states if needs else None

    def plan(t: int, layer: int) -> list[Request]:
        keys = planner.plan(
            layer,
            expert_ids[t : t + 1, : layer + 1],
            weights[t : t + 1, : layer + 1],
            token_ids[t : t + 1],
            hidden=None if states is None else states[t : t + 1, : layer + 1],
        )
        return in_token_requests(keys, t, layers)

    def guess_plan(t: int, ids: np.ndarray, probs: np.ndarray) -> list[Request]:
        return in_token_requests(next_token.plan(ids, probs), t + 1, layers)

    def experts_at(position: int) -> np.ndarray:
        return routing[position // layers, position % layers]

    guessed = {"made": 0, "right": 0}  # for timed tokens only
    x = torch.randn(1, hidden, device=transfer.device).bfloat16()
    start = time.perf_counter()
    try:
        for t in range(tokens):
            if t == warmup:
                _synchronize(transfer.device)
                session.restart_counts()  # the cache keeps what warm-up put there
                if planner is not None:  # like the cache, the memo keeps what warm-up put there
                    planner.hits = planner.misses = 0
                start = time.perf_counter()
            for layer in range(layers):
                if rule.prefetch == "predictor" and needs != "residual_out":  # the layer's routing is known
                    session.submit(functools.partial(plan, t, layer))
                keys = session.begin_layer(t, layer, sorted({int(e) for e in routing[t, layer] if e >= 0}))
                if rule.prefetch == "oracle":
                    position = session.position(t, layer)
                    session.request(
                        oracle_requests(experts_at, position, prefetch.oracle_reach, tokens * layers, layers)
                    )
                x = _layer(x, dense, (session.fetch(key) for key in keys))
                session.finish_layer(t, layer)
                if needs == "residual_out":  # the layer's output is known: what reads it plans now
                    session.submit(functools.partial(plan, t, layer))
                if next_token is not None and layer == next_token.guess_layer and t + 1 < tokens:
                    with session.predicting():
                        ids, probs = next_token.guess(residuals[t : t + 1])
                    if t >= warmup:
                        guessed["made"] += 1
                        guessed["right"] += int(ids[0, 0]) == token_ids[t + 1]
                    session.submit(functools.partial(guess_plan, t, ids, probs), keep=True)
        _synchronize(transfer.device)
    finally:
        session.close()
    seconds = time.perf_counter() - start
    result = session.results() | {"expert_bytes": slow.expert_nbytes(0), **(planner.stats() if planner else {})}
    if next_token is not None:  # how often the guess named the token that came next
        result["next_token_guesses"] = guessed["made"]
        result["next_token_guess_accuracy"] = guessed["right"] / guessed["made"] if guessed["made"] else None
    return ReplayResult(
        policy,
        getattr(predictor, "name", None),
        budget_bytes,
        tokens - warmup,
        seconds,
        result,
        eviction,
        planning if rule.prefetch == "predictor" else None,
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
