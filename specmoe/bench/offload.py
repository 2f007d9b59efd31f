"""``specmoe bench offload``: measured decoding speed per policy and fast-tier size.

Routing comes from a trace store's test split (recorded from a real model); experts have a
real model's shape with random bf16 weights (see :mod:`specmoe.offload.replay_engine`). On
``device="cpu"`` they sit on this machine's disk, read with the page cache bypassed, into a
RAM cache; on ``cuda`` they sit in pinned host memory and the cache is on the GPU. The
oracle prefetches the recorded future and evicts by it (Belady); ``oracle-prefetch``
prefetches it but evicts as the prefetch runs do, which separates what better prediction
could gain from what better eviction could. Both read ahead in decode
order, by default L-1 layers, into the next token (see :func:`replay`): as far as a
layer-keyed fast tier allows. Where one read outlasts even that, it is not a ceiling.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specmoe.bench.progress import FinishedRuns
from specmoe.errors import InputError
from specmoe.models.loading import load_model
from specmoe.offload.cache import EVICTIONS
from specmoe.offload.next_token import LogitLens, NextTokenPlanner
from specmoe.offload.replay_engine import PLANNING, ReplayResult, interference, random_experts, replay
from specmoe.offload.simulator import oracle_reach
from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import TraceDataset
from specmoe.traces.store import TraceStore

POLICIES = ("on-demand", "lru", "lfu", "lrfu", "belady", "prefetch", "prefetch+next-token", "oracle-prefetch", "oracle")
REPLAY_POLICY = {
    "on-demand": "on-demand",
    "prefetch": "prefetch",
    "prefetch+next-token": "prefetch",
    "oracle-prefetch": "oracle",
    "oracle": "oracle",
}
"""How :func:`replay` runs each policy; the others are caches (``cache``) that differ in eviction."""


def _test_tokens(store: TraceStore, tokens: int, split_seed: int, hidden_kinds=()):
    """The test split's first ``tokens`` tokens in order: routing, gate weights, token ids and
    the hidden states (T, L, D) of each of ``hidden_kinds``. Of a ``greedy`` store only the
    decoded tokens are taken (prompts are prefilled, not decoded)."""
    collection = store.manifest.collection
    missing = [kind for kind in hidden_kinds if kind not in collection.hidden]
    if missing:
        flag = {"residual_out": "--save-residuals", "router_input": "--save-router-inputs"}
        raise InputError(
            f"{store.directory} holds no {missing[0]} states, which next-token prefetch or a predictor "
            f"reads; collect it with {flag.get(missing[0], missing[0])}"
        )
    prompt_len = collection.seq_len - collection.generated_tokens if collection.mode == "greedy" else 0

    def take(hidden: str | None) -> list:
        parts, count = [], 0
        for batch in TraceDataset(store, "test", seed=split_seed, hidden=hidden).iter_batches(4096):
            decoded = torch.from_numpy(batch.positions >= prompt_len)
            if hidden is None:
                parts.append((batch.expert_ids[decoded], batch.gate_weights[decoded], batch.token_ids[decoded]))
            else:
                parts.append(batch.hidden[decoded])
            count += int(decoded.sum())
            if count >= tokens:
                break
        return parts

    routing, weights, token_ids = (torch.cat(column)[:tokens].numpy() for column in zip(*take(None)))
    states = {kind: torch.cat(take(kind))[:tokens] for kind in hidden_kinds}
    return routing, weights, token_ids, states


def _next_token_planners(store: TraceStore, predictors: list, layers: int, budget: int, **settings):
    """A factory of fresh next-token planners (each run counts its own guesses): the lens of
    the model the traces came from, the first token table among the predictors."""
    table = next((p for p in predictors if hasattr(p, "token_rows")), None)
    if table is None:
        raise InputError("--next-token-layer looks experts up by token: give a token predictor as a --predictor-dir")
    lens = LogitLens.of(load_model(store.manifest.model.id).model)
    return lambda: NextTokenPlanner(lens, table, num_layers=layers, budget=budget, **settings)


def benchmark_offload(
    traces: str | Path,
    *,
    predictor_dirs: list[Path],
    hidden: int,
    ffn: int,
    tokens: int = 48,
    cache_fractions=(0.1, 0.25, 0.5),
    lookahead: int = 1,
    split_seed: int = 0,
    experts_dir: Path | None = None,
    repeats: int = 3,
    warmup: int = 0,
    device: str = "cpu",
    budget: int | None = None,
    threshold: float = 0.0,
    oracle_lookahead: int | None = None,
    planning: str | tuple[str, ...] = "background",
    policies: tuple[str, ...] | None = None,
    prefetch_eviction: str = "lru",
    next_token_layer: int | None = None,
    next_token_depth: int = 1,
    next_token_candidates: int = 1,
    progress_file: Path | None = None,
) -> dict:
    """``progress_file``: where finished runs are kept as they finish, so that an
    interrupted call with the same arguments resumes; the caller removes it
    (:func:`specmoe.bench.progress.discard`) once it has saved the report."""
    settings = {k: v for k, v in locals().items() if k != "progress_file"}
    if device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this machine has no CUDA GPU")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu or cuda[:i], got {device!r}")
    if policies is not None:  # default: all, prefetch once per predictor given
        unknown = [p for p in policies if p not in POLICIES]
        if unknown or not policies:
            raise InputError(
                f"--policies must be a non-empty subset of {','.join(POLICIES)}, got {','.join(policies)!r}"
            )
        if {"prefetch", "prefetch+next-token"} & set(policies) and not predictor_dirs:
            raise InputError("--policies prefetch needs at least one --predictor-dir")
        if "prefetch+next-token" in policies and next_token_layer is None:
            raise InputError("--policies prefetch+next-token needs --next-token-layer")
    if prefetch_eviction not in EVICTIONS:
        raise InputError(f"--prefetch-eviction must be one of {', '.join(EVICTIONS)}, got {prefetch_eviction!r}")
    plannings = (planning,) if isinstance(planning, str) else tuple(planning)
    if not plannings or not set(plannings) <= set(PLANNING):
        raise InputError(f"--planning must be one of {', '.join(PLANNING)}, got {','.join(plannings)!r}")
    store = TraceStore.open(traces)
    model = store.manifest.model
    layers = model.stacks[store.default_stack()].num_layers
    predictors = [load_predictor(d) for d in predictor_dirs]
    names = [p.name for p in predictors]  # a name given twice (e.g. two lookahead variants) gets its directory
    labels = {
        id(p): p.name if names.count(p.name) == 1 else f"{p.name}:{Path(d).name}"
        for p, d in zip(predictors, predictor_dirs)
    }
    for predictor in predictors:
        predictor.check_fits(layers, model.num_experts, f"the traces in {store.directory} ({model.id})")
        if predictor.previous_tokens:
            raise InputError(f"the replay gives predictors no earlier tokens; {predictor.name} reads them")
    kinds = {p.needs_hidden for p in predictors if p.needs_hidden}
    guessing = next_token_layer is not None and "prefetch+next-token" in (policies or POLICIES)
    kinds |= {"residual_out"} if guessing else set()  # what the guess reads
    routing, gate_weights, token_ids, states = _test_tokens(store, warmup + tokens, split_seed, sorted(kinds))
    if len(routing) <= warmup:
        raise InputError(f"the test split has {len(routing)} tokens, not enough for --warmup {warmup} + tokens")
    try:  # checked here, before gigabytes of experts are written for the replay
        oracle_lookahead = oracle_reach(
            layers, max(layers - 1, 1) if oracle_lookahead is None else oracle_lookahead, "--oracle-lookahead"
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    budget = budget or 2 * model.top_k
    next_token = None
    if guessing:  # the lens loads the model: only when its runs are asked for
        next_token = _next_token_planners(
            store,
            predictors,
            layers,
            budget,
            threshold=threshold,
            guess_layer=next_token_layer,
            depth=next_token_depth,
            candidates=next_token_candidates,
        )
        next_token()  # settings checked now, before the experts are written
    slow_tier = "disk" if device == "cpu" else "host"
    rows = []
    with tempfile.TemporaryDirectory(dir=experts_dir) as tmp:
        files = random_experts(slow_tier, layers, model.num_experts, hidden, ffn, directory=Path(tmp))
        expert_bytes = files.expert_nbytes(0)
        # the largest fast tier plus a read in flight per thread, so no timed read faults in memory
        files.reserve_buffers(int(max(cache_fractions) * layers * model.num_experts) + 2)
        machine_interference = interference(files, layers, model.num_experts, device)
        total = layers * model.num_experts * expert_bytes
        first = plannings[0]  # policies that plan nothing run once
        runs = [("on-demand", None, "lru", first), ("lru", None, "lru", first), ("lfu", None, "lfu", first)]
        runs += [("lrfu", None, "lrfu", first), ("belady", None, "belady", first)]
        # several planning modes: each predictor's runs once per mode, interleaved with the rest
        runs += [("prefetch", p, prefetch_eviction, mode) for p in predictors for mode in plannings]
        if next_token is not None:
            runs += [("prefetch+next-token", p, prefetch_eviction, mode) for p in predictors for mode in plannings]
        # the recorded future prefetched but not evicted by: what prediction alone could reach
        runs += [("oracle-prefetch", None, prefetch_eviction, first), ("oracle", None, "belady", first)]
        runs = [run for run in runs if run[0] in (policies or POLICIES)]
        configs = [(fraction, *run) for fraction in cache_fractions for run in runs]
        timings: dict[int, list] = {i: [] for i in range(len(configs))}
        rng = np.random.default_rng(0)
        order = [int(i) for _ in range(repeats) for i in rng.permutation(len(configs))]
        finished = FinishedRuns(progress_file, settings)
        # rounds in shuffled order, so drift in disk speed hits every policy alike
        for run, i in enumerate(tqdm(order, desc="offload replay", unit="run")):
            if run in finished.done:
                timings[i].append(ReplayResult(**finished.done[run]))
                continue
            fraction, label, predictor, eviction, mode = configs[i]
            budget_bytes = max(expert_bytes * model.top_k, int(fraction * total))
            policy = REPLAY_POLICY.get(label, "cache")
            result = replay(
                files,
                routing,
                gate_weights,
                token_ids,
                policy=policy,
                budget_bytes=budget_bytes,
                predictor=predictor,
                lookahead=lookahead,
                budget=budget,
                threshold=threshold,
                num_experts=model.num_experts,
                eviction=eviction,
                device=device,
                warmup=warmup,
                oracle_lookahead=oracle_lookahead,
                planning=mode,
                next_token=next_token() if label == "prefetch+next-token" else None,
                residuals=states["residual_out"][:, next_token_layer] if guessing else None,
                states=states.get(getattr(predictor, "needs_hidden", None)),
            )
            result.policy, result.eviction = label, eviction
            result.planning = mode if policy == "prefetch" else None
            result.predictor = labels[id(predictor)] if predictor is not None else None
            timings[i].append(result)
            finished.add(run, dataclasses.asdict(result))
        for i, (fraction, *_rest) in enumerate(configs):
            results = sorted(timings[i], key=lambda r: r.seconds)
            row = results[len(results) // 2].row(fraction)  # the median run
            row["seconds_all_repeats"] = [round(r.seconds, 4) for r in timings[i]]
            rows.append(row)
        files.close()
    for fraction in cache_fractions:
        group = [r for r in rows if r["cache_fraction"] == fraction]
        floor = next((r["tokens_per_s"] for r in group if r["policy"] == "on-demand"), None)
        ceiling = next((r["tokens_per_s"] for r in group if r["policy"] == "oracle"), None)
        for r in group:  # None where that policy was not run
            r["speedup_vs_on_demand"] = r["tokens_per_s"] / floor if floor else None
            r["fraction_of_oracle"] = r["tokens_per_s"] / ceiling if ceiling else None
    return {
        "benchmark": "offload",
        "simulated": False,
        "traces": str(store.directory),
        "routing_from": model.id,
        "expert_shape": {"hidden": hidden, "ffn": ffn, "dtype": "bfloat16", "bytes": expert_bytes},
        "num_layers": layers,
        "num_experts": model.num_experts,
        "top_k": model.top_k,
        "tokens": len(routing) - warmup,
        "warmup_tokens": warmup,
        "prefetch": {
            "lookahead": lookahead,
            "budget": budget,
            "threshold": threshold,
            "planning": ",".join(plannings),
            "eviction": prefetch_eviction,
        },
        "next_token": None
        if next_token is None
        else {"layer": next_token_layer, "depth": next_token_depth, "candidates": next_token_candidates},
        "oracle_lookahead": oracle_lookahead,
        "traces_mode": store.manifest.collection.mode,
        "repeats": repeats,
        "slow_tier": "disk, O_DIRECT or page cache dropped" if slow_tier == "disk" else "pinned host memory",
        "fast_tier": "RAM" if device == "cpu" else f"GPU memory ({torch.cuda.get_device_name(device)})",
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "interference": machine_interference,
        },
        "rows": rows,
    }
