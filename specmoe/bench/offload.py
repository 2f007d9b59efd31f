"""``specmoe bench offload``: measured decoding speed per policy and fast-tier size.

Routing comes from a trace store's test split (recorded from a real model); experts have a
real model's shape with random bf16 weights (see :mod:`specmoe.bench.replay`). On
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
from specmoe.bench.replay import ReplayResult, interference, random_experts, replay
from specmoe.bench.settings import OffloadBenchSettings
from specmoe.errors import InputError
from specmoe.models.offloaded import load_offloaded
from specmoe.offload.live.next_token import LogitLens, NextTokenPlanner
from specmoe.offload.policy import POLICIES
from specmoe.offload.settings import TierSize
from specmoe.predictors.base import load_predictor
from specmoe.predictors.data import TraceDataset
from specmoe.traces.store import TraceStore


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


def _next_token_planners(store: TraceStore, predictors: list, layers: int, settings, prefetch):
    """A factory of fresh next-token planners (each run counts its own guesses): the lens of
    the model the traces came from, the first token table among the predictors."""
    table = next((p for p in predictors if hasattr(p, "token_rows")), None)
    if table is None:
        raise InputError("--next-token-layer looks experts up by token: give a token predictor as a --predictor-dir")
    lens = LogitLens.of(load_offloaded(store.manifest.model.id, dtype="float32", progress=False).loaded.model)
    return lambda: NextTokenPlanner(lens, table, settings, layers, prefetch)


def _runs(policies: tuple[str, ...], predictors: list, plannings: tuple[str, ...]) -> list[tuple]:
    """(policy, predictor, planning) of every run, in the order of :data:`POLICIES`; each
    prefetching policy once per predictor and planning mode, the others once."""
    runs = []
    for name in POLICIES:
        if name not in policies:
            continue
        if POLICIES[name].prefetch == "predictor":
            runs += [(name, p, mode) for p in predictors for mode in plannings]
        else:
            runs.append((name, None, plannings[0]))
    return runs


def benchmark_offload(
    traces: str | Path,
    predictor_dirs: list[Path],
    settings: OffloadBenchSettings | None = None,
    *,
    split_seed: int = 0,
    experts_dir: Path | None = None,
    progress_file: Path | None = None,
) -> dict:
    """Measured decoding per policy and fast-tier size. ``progress_file``: where finished
    runs are kept as they finish, so that an interrupted call with the same arguments
    resumes; the caller removes it (:func:`specmoe.bench.progress.discard`) once it has
    saved the report."""
    s = settings or OffloadBenchSettings()
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {s.device}: this machine has no CUDA GPU")
    policies = s.policies or tuple(POLICIES)
    asked = set(s.policies or ())
    if {"prefetch", "prefetch+next-token"} & asked and not predictor_dirs:
        raise InputError("--policies prefetch needs at least one --predictor-dir")
    if "prefetch+next-token" in asked and s.next_token is None:
        raise InputError("--policies prefetch+next-token needs --next-token-layer")
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
    if not predictors:  # nothing predicts: prefetch runs are left out unless asked for (refused above)
        policies = tuple(p for p in policies if POLICIES[p].prefetch != "predictor")
    prefetch = s.prefetch.resolve(top_k=model.top_k, num_layers=layers)  # checked before experts are written
    guessing = s.next_token is not None and "prefetch+next-token" in policies
    if not guessing:
        policies = tuple(p for p in policies if p != "prefetch+next-token")
    kinds = {p.needs_hidden for p in predictors if p.needs_hidden}
    kinds |= {"residual_out"} if guessing else set()  # what the guess reads
    routing, gate_weights, token_ids, states = _test_tokens(store, s.warmup + s.tokens, split_seed, sorted(kinds))
    if len(routing) <= s.warmup:
        raise InputError(f"the test split has {len(routing)} tokens, not enough for --warmup {s.warmup} + tokens")
    next_token = None
    if guessing:  # the lens loads the model: only when its runs are asked for
        next_token = _next_token_planners(store, predictors, layers, s.next_token, prefetch)
        next_token()  # settings checked now, before the experts are written
    slow_tier = "disk" if s.device == "cpu" else "host"
    hidden, ffn = s.expert_shape
    rows = []
    with tempfile.TemporaryDirectory(dir=experts_dir) as tmp:
        files = random_experts(slow_tier, layers, model.num_experts, hidden, ffn, directory=Path(tmp))
        expert_bytes = files.expert_nbytes(0)
        # the largest fast tier plus a read in flight per thread, so no timed read faults in memory
        files.reserve_buffers(int(max(s.cache_fractions) * layers * model.num_experts) + 2)
        machine_interference = interference(files, layers, model.num_experts, s.device)
        total = layers * model.num_experts * expert_bytes
        configs = [
            (fraction, *run) for fraction in s.cache_fractions for run in _runs(policies, predictors, s.planning)
        ]
        timings: dict[int, list] = {i: [] for i in range(len(configs))}
        rng = np.random.default_rng(0)
        order = [int(i) for _ in range(s.repeats) for i in rng.permutation(len(configs))]
        identity = {"traces": str(traces), "predictors": [str(d) for d in predictor_dirs], "split_seed": split_seed}
        finished = FinishedRuns(progress_file, identity | s.model_dump(mode="json"))
        # rounds in shuffled order, so drift in disk speed hits every policy alike
        for run, i in enumerate(tqdm(order, desc="offload replay", unit="run")):
            if run in finished.done:
                timings[i].append(ReplayResult(**finished.done[run]))
                continue
            fraction, label, predictor, mode = configs[i]
            result = replay(
                files,
                routing,
                gate_weights,
                token_ids,
                policy=label,
                budget_bytes=TierSize(fraction=fraction).bytes_for(total, expert_bytes),
                num_experts=model.num_experts,
                prefetch=prefetch,
                predictor=predictor,
                device=s.device,
                warmup=s.warmup,
                planning=mode,
                next_token=next_token() if POLICIES[label].next_token else None,
                residuals=states["residual_out"][:, s.next_token.layer] if guessing else None,
                states=states.get(getattr(predictor, "needs_hidden", None)),
            )
            result.predictor = labels[id(predictor)] if predictor is not None else None
            timings[i].append(result)
            finished.add(run, dataclasses.asdict(result))
        for i, (fraction, *_rest) in enumerate(configs):
            results = sorted(timings[i], key=lambda r: r.seconds)
            row = results[len(results) // 2].row(fraction)  # the median run
            row["seconds_all_repeats"] = [round(r.seconds, 4) for r in timings[i]]
            row["stall_ms_per_token_all_repeats"] = [round(1e3 * r.stats["stall_s"] / r.tokens, 3) for r in timings[i]]
            rows.append(row)
        files.close()
    for fraction in s.cache_fractions:
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
        "tokens": len(routing) - s.warmup,
        "warmup_tokens": s.warmup,
        "prefetch": prefetch.model_dump(),
        "planning": list(s.planning),
        "next_token": s.next_token.model_dump() if guessing else None,
        "traces_mode": store.manifest.collection.mode,
        "repeats": s.repeats,
        "settings": s.model_dump(mode="json"),
        "slow_tier": "disk, O_DIRECT or page cache dropped" if slow_tier == "disk" else "pinned host memory",
        "fast_tier": "RAM" if s.device == "cpu" else f"GPU memory ({torch.cuda.get_device_name(s.device)})",
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "interference": machine_interference,
        },
        "rows": rows,
    }


def offload_table(report: dict) -> str:
    """The rows as a plain-text table: median tokens/s, and stall per token with the range
    over repeats (the steadier measure on a shared machine)."""
    lines = [
        f"{'cache':>6} {'policy':<32} {'tok/s':>8} {'stall ms/tok [range]':>22} {'hit':>6} {'MB read':>9} "
        f"{'of oracle':>9} {'predict':>7} {'bg CPU':>7}"
    ]
    for r in report["rows"]:
        label = r["policy"] + (f":{r['predictor']}" if r["predictor"] else "")
        label += f"/{r['eviction']}" if POLICIES[r["policy"]].eviction is None and r["eviction"] != "lru" else ""
        label += f"/{r['planning']}" if r.get("planning") not in (None, "background") else ""
        stalls = r["stall_ms_per_token_all_repeats"]
        stall = f"{sorted(stalls)[len(stalls) // 2]:.2f} [{min(stalls):.2f}-{max(stalls):.2f}]"
        of_oracle = "-" if r["fraction_of_oracle"] is None else f"{r['fraction_of_oracle']:.3f}"
        lines.append(
            f"{r['cache_fraction']:>6.2f} {label:<32} {r['tokens_per_s']:>8.2f} {stall:>22} {r['hit_rate']:>6.3f} "
            f"{r['bytes_read'] / 2**20:>9.1f} {of_oracle:>9} {r['predictor_cpu_fraction']:>7.2%} "
            f"{r['predictor_background_cpu_fraction']:>7.2%}"
        )
    return "\n".join(lines)
