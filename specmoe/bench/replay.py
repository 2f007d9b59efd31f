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
from specmoe.offload.policy import EventLog, Forecast, LinkModel, PrefetchSettings, oracle_requests, policy_named
from specmoe.offload.simulated.simulator import NO_TOKEN
from specmoe.predictors.calibration import Calibration


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
    batch_size: int = 1
    compute_cost: str | None = None
    """How the value rule priced what a read costs the layers (its runs only): ``learnt`` or
    ``probe`` (:class:`~specmoe.bench.settings.OffloadBenchSettings`)."""

    def row(self, cache_fraction: float) -> dict:
        return {
            "policy": self.policy,
            "predictor": self.predictor,
            "eviction": self.eviction,
            "planning": self.planning,
            "compute_cost": self.compute_cost,
            "cache_fraction": cache_fraction,
            "batch_size": self.batch_size,
            "budget_bytes": self.budget_bytes,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": self.tokens / self.seconds,
            "time_per_token_ms": 1e3 * self.seconds / self.tokens,
            "stall_ms_per_token": 1e3 * self.stats["stall_s"] / self.tokens,
            "stall_fraction": self.stats["stall_s"] / self.seconds,
            "stall_ms_per_token_by_layer": [
                round(1e3 * s / self.tokens, 3) for s in self.stats.get("stall_s_by_layer", [])
            ],
            "predictor_fraction": self.stats["predict_s"] / self.seconds,
            "predictor_cpu_fraction": self.stats["predict_cpu_s"] / self.seconds,
            "predictor_background_cpu_fraction": self.stats["plan_cpu_s"] / self.seconds,
            "plan_memo_hit_rate": self.stats.get("plan_memo_hit_rate"),
            "next_token_guess_accuracy": self.stats.get("next_token_guess_accuracy"),
            "recurrence_matched": self.stats.get("recurrence_matched"),  # warm-up included
            "recurrence_precision": self.stats.get("recurrence_precision"),
            "link_model": self.stats.get("link_model"),
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
    calibration: Calibration | None = None,
    link: LinkModel | None = None,
    device: str = "cpu",
    warmup: int = 0,
    planning: str = "background",
    next_token: NextTokenPlanner | None = None,
    residuals: torch.Tensor | None = None,
    states: torch.Tensor | None = None,
    sequences: np.ndarray | None = None,
    log: EventLog | None = None,
) -> ReplayResult:
    """Decode ``routing`` (T steps, L layers, k; or T steps of B sequences in lockstep, (T, B,
    L, k), ``NO_TOKEN`` where a sequence has ended) on ``device`` under the named ``policy``
    (:data:`~specmoe.offload.policy.POLICIES`), taking each layer's steps in the order the
    model runtime takes them (:class:`DecodingSession`); a layer needs the union of its
    tokens' experts, and each expert computes on the tokens routed to it. The first
    ``warmup`` steps fill the cache and are neither timed nor counted.

    A predictor forecasts layers l+1..l+``layers_ahead`` of the tokens it has seen routed
    (probabilities from its ``calibration``, if given), pooled over the batch; policies that
    weigh reads by value price them with ``link`` (default: one that learns this machine's
    times as it decodes). The oracle reads the recorded future ``prefetch.oracle_reach``
    layers ahead in decode order (default L-1), into the next token's layers, since on a
    slow disk one read outlasts several layers' compute.

    A predictor that reads hidden states gets them from ``states`` (T, [B,] L, D), recorded,
    of its kind (``predictor.needs_hidden``): a router input at the layer's routing, a
    residual output once the layer has run. ``next_token`` (with a ``+next-token`` policy):
    once its guess layer has run, also forecast the next token's first layers from a guess
    made from ``residuals`` (T, [B,] D), the recorded residual stream after that layer. A
    predictor that reads earlier tokens gets those of the same sequence (``sequences`` (T,
    [B]): which sequence each token is of; default: one per slot)."""
    if routing.ndim == 3:  # one sequence
        routing, gate_weights, token_ids = routing[:, None], gate_weights[:, None], token_ids[:, None]
        sequences = None if sequences is None else sequences[:, None]
        states = None if states is None else states[:, None]
        residuals = None if residuals is None else residuals[:, None]
    steps, batch, layers, top_k = routing.shape
    rule = policy_named(policy)
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup must be in [0, {steps}) for {steps} steps, got {warmup}")
    if rule.next_token != (next_token is not None):
        raise ValueError(f"policy {policy!r} {'needs' if rule.next_token else 'takes no'} next_token")
    if next_token is not None and (residuals is None or len(residuals) != steps):
        raise ValueError("next_token needs the guess layer's residuals of every token")
    if rule.prefetch == "predictor" and predictor is None:
        raise ValueError(f"policy {policy!r} needs a predictor")
    needs = getattr(predictor, "needs_hidden", None) if rule.prefetch == "predictor" else None
    if needs and (states is None or tuple(states.shape[:3]) != (steps, batch, layers)):
        raise ValueError(
            f"predictor {predictor.name} reads {needs} states: pass states of shape ({steps}, {layers}, D)"
        )
    prefetch = rule.resolve(prefetch or PrefetchSettings(), top_k=top_k, num_layers=layers)
    eviction = rule.eviction_for(prefetch)
    if link is None and rule.selection == "value":
        link = LinkModel(1.0, 1.0, learn=True)  # no figures yet: learnt from the first reads and layers
    present = routing[:, :, 0, 0] != NO_TOKEN  # (T, B)
    per_layer = routing.transpose(0, 2, 1, 3).reshape(steps, layers, -1)  # a batch's union per layer
    transfer = Transfer(slow, device)
    session = DecodingSession(
        transfer,
        budget_bytes,
        num_layers=layers,
        eviction=eviction,
        prefetching=rule.prefetch != "none",
        keeps_experts=rule.keeps_experts,
        planning=planning,
        future_uses=future_uses(per_layer, layers) if eviction == "belady" else None,
        log=log,
        rule=rule,
        link=link,
    )
    planner = None
    if rule.prefetch == "predictor":
        planner = PrefetchPlanner(predictor, layers, num_experts, prefetch, rule, calibration)
    hidden = slow.read(0, 0)[0].shape[1]
    dense = _dense_stand_in(hidden, transfer.device)
    # Converted once: a predictor sees its tokens' routing up to the current layer.
    expert_ids, weights = routing.astype(np.int64), gate_weights.astype(np.float32)
    token_ids = token_ids.astype(np.int64)
    states = states if needs else None
    earlier = getattr(predictor, "previous_tokens", 0) if planner is not None else 0
    if sequences is None:
        sequences = np.zeros((steps, batch), dtype=np.int64)

    def previous(t: int, live: np.ndarray) -> np.ndarray | None:
        """(N, P, L, k): the routing of the P tokens before step t of each live sequence."""
        if not earlier:
            return None
        out = np.full((batch, earlier, layers, top_k), NO_TOKEN, dtype=np.int64)
        for back in range(1, min(earlier, t) + 1):
            same = sequences[t - back] == sequences[t]
            out[same, back - 1] = expert_ids[t - back, same]
        return out[live]

    def plan(t: int, layer: int) -> Forecast:
        live = present[t]
        rows = planner.plan(
            layer,
            expert_ids[t, live, : layer + 1],
            weights[t, live, : layer + 1],
            token_ids[t, live],
            hidden=None if states is None else states[t, live, : layer + 1],
            previous=previous(t, live),
        )
        return Forecast.of_rows(rows, t, layers, session.position(t, layer))

    def guess_plan(t: int, ids: np.ndarray, probs: np.ndarray) -> Forecast:
        rows = next_token.plan(ids, probs, by_value=rule.selection != "budget")
        return Forecast.of_rows(rows, t + 1, layers, session.position(t, next_token.guess_layer))

    def experts_at(position: int) -> np.ndarray:
        return per_layer[position // layers, position % layers]

    guessed = {"made": 0, "right": 0}  # for timed tokens only
    x = torch.randn(batch, hidden, device=transfer.device).bfloat16()
    start = time.perf_counter()
    try:
        for t in range(steps):
            if t == warmup:
                _synchronize(transfer.device)
                session.restart_counts()  # the cache keeps what warm-up put there
                if planner is not None:  # like the cache, the memo keeps what warm-up put there
                    planner.hits = planner.misses = 0
                start = time.perf_counter()
            if rule.recurrence:
                session.begin_token(t, np.where(present[t], token_ids[t], NO_TOKEN), sequences[t])
            for layer in range(layers):
                if rule.prefetch == "predictor" and needs != "residual_out":  # the layer's routing is known
                    session.submit(functools.partial(plan, t, layer))
                routed = routing[t, :, layer]  # (B, k)
                keys = session.begin_layer(t, layer, sorted({int(e) for e in routed.reshape(-1) if e >= 0}))
                if rule.prefetch == "oracle":
                    position = session.position(t, layer)
                    session.request(
                        oracle_requests(experts_at, position, prefetch.oracle_reach, steps * layers, layers)
                    )
                x = _layer(x, dense, ((session.fetch(key), _tokens_of(routed, key[1])) for key in keys))
                session.finish_layer(t, layer)
                if needs == "residual_out":  # the layer's output is known: what reads it plans now
                    session.submit(functools.partial(plan, t, layer))
                if next_token is not None and layer == next_token.guess_layer and t + 1 < steps:
                    live = present[t]
                    with session.predicting():
                        ids, probs = next_token.guess(residuals[t, live])
                    if t >= warmup:
                        following = present[t + 1, live]
                        guessed["made"] += int(following.sum())
                        guessed["right"] += int((ids[following, 0] == token_ids[t + 1, live][following]).sum())
                    session.submit(functools.partial(guess_plan, t, ids, probs), keep=True)
            if rule.recurrence:
                session.end_token(routing[t])
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
        int(present[warmup:].sum()),
        seconds,
        result,
        eviction,
        planning if rule.prefetch == "predictor" else None,
        batch,
    )


def _tokens_of(routed: np.ndarray, expert: int) -> np.ndarray | None:
    """Which of the batch's tokens (routing (B, k)) go to ``expert``; None: all of them."""
    rows = (routed == expert).any(-1)
    return None if rows.all() else rows


def _layer(x: torch.Tensor, dense: torch.Tensor, experts) -> torch.Tensor:
    """One layer of the stand-in model on the batch's tokens x (B, D): the attention-sized
    dense matmul, then each expert's SwiGLU FFN (its (gate_up, down) pair, fetched as the loop
    reaches it) on the tokens routed to it (a (B,) mask; None: all)."""
    batch, hidden = x.shape
    x = x + torch.nn.functional.linear(x, dense).view(batch, 4, hidden).sum(1)
    out = torch.zeros_like(x)
    for (gate_up, down), rows in experts:
        if rows is None:
            gate, up = torch.nn.functional.linear(x, gate_up).chunk(2, dim=-1)
            out += torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)
            continue
        rows = torch.from_numpy(rows).to(x.device)
        gate, up = torch.nn.functional.linear(x[rows], gate_up).chunk(2, dim=-1)
        out[rows] += torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down)
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
        _layer(x, dense, [(experts[0], None)])
        _synchronize(transfer.device)
        began = time.perf_counter()
        for i in range(layers):
            _layer(x, dense, [(experts[i % len(experts)], None)])
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
