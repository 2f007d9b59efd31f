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
import itertools
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specmoe.bench.decoding import decode_steps
from specmoe.bench.progress import FinishedRuns
from specmoe.bench.replay import ReplayResult, interference, random_experts, replay
from specmoe.bench.settings import OffloadBenchSettings
from specmoe.errors import InputError
from specmoe.models.offloaded import load_offloaded
from specmoe.offload.live.next_token import LogitLens, NextTokenPlanner
from specmoe.offload.policy import POLICIES, PRESETS, LinkModel, lru_gap_closed, predictors_for
from specmoe.offload.settings import TierSize
from specmoe.predictors.base import load_predictor
from specmoe.predictors.calibration import calibration_for
from specmoe.traces.store import TraceStore


def _next_token_planners(store: TraceStore, predictors: list, layers: int, settings, prefetch, calibrations):
    """A factory of fresh next-token planners (each run counts its own guesses): the lens of
    the model the traces came from, the first token table among the predictors."""
    table = next((p for p in predictors if hasattr(p, "token_rows")), None)
    if table is None:
        raise InputError("--next-token-layer looks experts up by token: give a token predictor as a --predictor-dir")
    lens = LogitLens.of(load_offloaded(store.manifest.model.id, dtype="float32", progress=False).loaded.model)
    return lambda: NextTokenPlanner(lens, table, settings, layers, prefetch, calibrations.get(id(table)))


def _runs(
    policies: tuple[str, ...], predictors: list, labels: dict, plannings: tuple[str, ...], pricings: tuple[str, ...]
) -> list[tuple]:
    """(policy, predictor, planning, compute-cost pricing) of every run, in the order of
    :data:`POLICIES`; each policy with a predictor once per planning mode and per predictor
    (the one named after its colon, else the one it was built around where given, else
    each), and once per pricing if it weighs reads by value; the others once."""
    runs = []
    names = [p.name for p in predictors]
    for name in POLICIES:
        for entry in policies:
            policy, _, wanted = entry.partition(":")
            if policy != name:
                continue
            if POLICIES[name].prefetch != "predictor":
                runs.append((name, None, plannings[0], None))
                continue
            if wanted:
                chosen = [p for p in predictors if wanted in (p.name, labels[id(p)])]
                if not chosen:
                    raise InputError(f"--policies {entry}: no --predictor-dir holds a predictor {wanted!r}")
            else:
                chosen = [predictors[i] for i in predictors_for(POLICIES[name], names)]
            priced = pricings if POLICIES[name].selection == "value" else (None,)
            runs += [(name, p, mode, pricing) for p in chosen for mode in plannings for pricing in priced]
    return runs


def _policy(entry: str) -> str:
    """The policy of a ``--policies`` entry (``policy`` or ``policy:predictor``)."""
    return entry.partition(":")[0]


def _link(probe: dict, pricing: str | None = "learnt") -> LinkModel:
    """The times reads are weighed in, from the start: the probe's read beside a computing
    layer and layer beside a read, and what a read costs the layers beside it (their slowdown
    in the probe); the read and layer times are learnt further as each run decodes, and, with
    ``learnt`` pricing, what a read costs the layers (as the runtime learns it)."""
    read_ms = probe.get("expert_load_ms_while_computing") or probe["expert_load_ms"]
    layer_ms = probe["layer_compute_ms_while_loading"]
    # The read's own work is what it takes alone; beside a layer it stretches as they share
    # the cores. Priced by the stretched read, the cost came out 1.5-2.6x what prefetch runs
    # lost outside their stalls per read (docs/benchmarks.md, "What a read costs").
    compute_ms = LinkModel.compute_cost_of(probe["expert_load_ms"], probe["layer_compute_ms"], layer_ms)
    return LinkModel(
        read_ms / 1e3,
        layer_ms / 1e3,
        compute_cost_s=compute_ms / 1e3,
        learn=True,
        learn_compute_cost=pricing == "learnt",
    )


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
    policies = s.policies or tuple(p for p in POLICIES if p not in PRESETS)  # the anchors' when asked for
    asked = {entry.partition(":")[0] for entry in s.policies or ()}
    predicted = sorted(p for p in asked if POLICIES[p].prefetch == "predictor")
    if predicted and not predictor_dirs:
        raise InputError(f"--policies {','.join(predicted)} needs at least one --predictor-dir")
    guessed = sorted(p for p in asked if POLICIES[p].next_token)
    if guessed and s.next_token is None:
        raise InputError(f"--policies {','.join(guessed)} needs --next-token-layer")
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
    if not predictors:  # nothing predicts: prefetch runs are left out unless asked for (refused above)
        policies = tuple(p for p in policies if POLICIES[_policy(p)].prefetch != "predictor")
    prefetch = s.prefetch.resolve(top_k=model.top_k, num_layers=layers)  # checked before experts are written
    guessing = s.next_token is not None and any(POLICIES[_policy(p)].next_token for p in policies)
    if not guessing:
        policies = tuple(p for p in policies if not POLICIES[_policy(p)].next_token)
    kinds = {p.needs_hidden for p in predictors if p.needs_hidden}
    kinds |= {"residual_out"} if guessing else set()  # what the guess reads
    batches = {b: decode_steps(store, s.warmup + s.tokens, b, split_seed, sorted(kinds)) for b in s.batch_sizes}
    short = [b for b, steps in batches.items() if len(steps) <= s.warmup]
    if short:
        raise InputError(f"the test split has too few tokens for --warmup {s.warmup} + tokens at batch {short[0]}")
    calibrations = {  # what turns a predictor's scores into probabilities: fitted on the validation split
        id(p): calibration_for(p, d, store, split_seed=split_seed)
        for p, d in zip(predictors, predictor_dirs)
        if any(POLICIES[_policy(entry)].prefetch == "predictor" for entry in policies)
    }
    next_token = None
    if guessing:  # the lens loads the model: only when its runs are asked for
        next_token = _next_token_planners(store, predictors, layers, s.next_token, prefetch, calibrations)
        next_token()  # settings checked now, before the experts are written
    runs = _runs(policies, predictors, labels, s.planning, s.compute_cost)  # names checked before experts are written
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
        configs = [(batch, fraction, *run) for batch in s.batch_sizes for fraction in s.cache_fractions for run in runs]
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
            batch, fraction, label, predictor, mode, pricing = configs[i]
            steps = batches[batch]
            result = replay(
                files,
                steps.routing,
                steps.gate_weights,
                steps.token_ids,
                policy=label,
                budget_bytes=TierSize(fraction=fraction).bytes_for(total, expert_bytes),
                num_experts=model.num_experts,
                prefetch=prefetch,
                predictor=predictor,
                calibration=calibrations.get(id(predictor)),
                link=_link(machine_interference, pricing),
                device=s.device,
                warmup=s.warmup,
                planning=mode,
                next_token=next_token() if POLICIES[label].next_token else None,
                residuals=steps.states["residual_out"][:, :, s.next_token.layer] if guessing else None,
                states=steps.states.get(getattr(predictor, "needs_hidden", None)),
                sequences=steps.windows,
            )
            result.predictor = labels[id(predictor)] if predictor is not None else None
            result.compute_cost = pricing
            timings[i].append(result)
            finished.add(run, dataclasses.asdict(result))
        for i, (_batch, fraction, *_rest) in enumerate(configs):
            results = sorted(timings[i], key=lambda r: r.seconds)
            row = results[len(results) // 2].row(fraction)  # the median run
            row["seconds_all_repeats"] = [round(r.seconds, 4) for r in timings[i]]
            row["stall_ms_per_token_all_repeats"] = [round(1e3 * r.stats["stall_s"] / r.tokens, 3) for r in timings[i]]
            rows.append(row)
        files.close()
    for batch, fraction in itertools.product(s.batch_sizes, s.cache_fractions):
        group = [r for r in rows if r["cache_fraction"] == fraction and r["batch_size"] == batch]
        floor = next((r["tokens_per_s"] for r in group if r["policy"] == "on-demand"), None)
        ceiling = next((r["tokens_per_s"] for r in group if r["policy"] == "oracle"), None)
        for r in group:  # None where that policy was not run
            r["speedup_vs_on_demand"] = r["tokens_per_s"] / floor if floor else None
            r["fraction_of_oracle"] = r["tokens_per_s"] / ceiling if ceiling else None
        lru_gap_closed(group, _median_stall)
    return {
        "benchmark": "offload",
        "simulated": False,
        "traces": str(store.directory),
        "routing_from": model.id,
        "expert_shape": {"hidden": hidden, "ffn": ffn, "dtype": "bfloat16", "bytes": expert_bytes},
        "num_layers": layers,
        "num_experts": model.num_experts,
        "top_k": model.top_k,
        "tokens": len(batches[s.batch_sizes[0]]) - s.warmup,
        "warmup_tokens": s.warmup,
        "steps_by_batch_size": {str(b): len(steps) - s.warmup for b, steps in batches.items()},
        "calibration": {labels[id(p)]: c.source for p, c in zip(predictors, calibrations.values())},
        "prefetch": prefetch.model_dump(),
        "planning": list(s.planning),
        "compute_cost": list(s.compute_cost),
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


def _median_stall(row: dict) -> float:
    """The row's stall per token, the median of its repeats (the steadier measure)."""
    stalls = row["stall_ms_per_token_all_repeats"]
    return sorted(stalls)[len(stalls) // 2]


def offload_table(report: dict) -> str:
    """The rows as a plain-text table: median tokens/s, and stall per token with the range
    over repeats (the steadier measure on a shared machine)."""
    lines = [
        (
            f"{'batch':>5} {'cache':>6} {'policy':<40} {'tok/s':>8} {'stall ms/tok [range]':>22} {'hit':>6} "
            f"{'MB read':>9} {'of oracle':>9} {'LRU gap':>8} {'predict':>7} {'bg CPU':>7}"
        )
    ]
    for r in report["rows"]:
        label = r["policy"] + (f":{r['predictor']}" if r["predictor"] else "")
        label += f"/{r['eviction']}" if POLICIES[r["policy"]].eviction is None and r["eviction"] != "lru" else ""
        label += f"/{r['planning']}" if r.get("planning") not in (None, "background") else ""
        label += f"/{r['compute_cost']}-priced" if r.get("compute_cost") not in (None, "learnt") else ""
        stalls = r["stall_ms_per_token_all_repeats"]
        stall = f"{_median_stall(r):.2f} [{min(stalls):.2f}-{max(stalls):.2f}]"
        of_oracle = "-" if r["fraction_of_oracle"] is None else f"{r['fraction_of_oracle']:.3f}"
        lru_gap = "-" if r.get("lru_gap_closed") is None else f"{r['lru_gap_closed']:.3f}"
        lines.append(
            f"{r.get('batch_size', 1):>5} {r['cache_fraction']:>6.2f} {label:<40} {r['tokens_per_s']:>8.2f} {stall:>22} "
            f"{r['hit_rate']:>6.3f} "
            f"{r['bytes_read'] / 2**20:>9.1f} {of_oracle:>9} {lru_gap:>8} {r['predictor_cpu_fraction']:>7.2%} "
            f"{r['predictor_background_cpu_fraction']:>7.2%}"
        )
    return "\n".join(lines)
