"""``specmoe simulate``: every policy over fast-tier sizes and batch sizes.

Everything here is a SIMULATION under a cost model; rows carry ``"simulated": true`` and
the plot says so in its title.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from specmoe.errors import InputError
from specmoe.evaluation.evaluate import dataset_for
from specmoe.offload.cache import EVICTIONS
from specmoe.offload.cost import HardwareProfile
from specmoe.offload.replay import decode_order
from specmoe.offload.simulator import SimulationConfig, oracle_reach, simulate
from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import TraceDataset
from specmoe.traces.store import TraceStore


@dataclass
class SweepConfig:
    cache_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    """Fast-tier size as a fraction of all routed experts of the stack."""
    batch_sizes: tuple[int, ...] = (1,)
    lookahead: int = 1
    budget: int | None = None
    """Experts per target layer a predictor may prefetch (default: 2k)."""
    threshold: float = 0.0
    prefetch_eviction: str = "lru"
    max_windows: int | None = 64
    split: str = "test"
    split_seed: int = 0
    cache_evictions: tuple[str, ...] = field(default=("lru", "lfu", "lrfu", "belady"))
    oracle_lookahead: int | None = None
    """Layers the oracle reads ahead in decode order, into the next token (None: L-1, as far
    as a layer-keyed fast tier allows; the measured benchmark's oracle does the same)."""

    def __post_init__(self):
        # checked here, not when the first run of the sweep builds its policy
        for name in (self.prefetch_eviction, *self.cache_evictions):
            if name not in EVICTIONS:
                raise InputError(f"eviction must be one of {', '.join(EVICTIONS)}, got {name!r}")


def run_sweep(
    traces: str | Path,
    profile: HardwareProfile,
    expert_bytes: int,
    predictors: dict[str, ExpertPredictor],
    cfg: SweepConfig,
    progress: bool = True,
) -> dict:
    store = TraceStore.open(traces)
    stack = store.default_stack()
    layers = store.manifest.model.stacks[stack].num_layers
    experts = store.manifest.model.num_experts
    top_k = store.manifest.model.top_k
    budget = cfg.budget or 2 * top_k
    requested = max(layers - 1, 1) if cfg.oracle_lookahead is None else cfg.oracle_lookahead
    try:
        reach = oracle_reach(layers, requested, "--oracle-lookahead")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    rows = []
    for batch_size in cfg.batch_sizes:
        base = TraceDataset(store, cfg.split, seed=cfg.split_seed)
        routing, _ = decode_order(base, batch_size=batch_size, max_windows=cfg.max_windows)
        predicted = {}
        for name, predictor in predictors.items():
            data = dataset_for(predictor, store, cfg.split, cfg.split_seed, base.splits)
            predicted[name] = decode_order(
                data, predictor, batch_size=batch_size, budget=budget, max_windows=cfg.max_windows
            )[1]
        runs = [("on-demand", "none", None, "lru")]
        runs += [("cache", e, None, e) for e in cfg.cache_evictions]
        runs += [("prefetch", cfg.prefetch_eviction, name, cfg.prefetch_eviction) for name in predictors]
        runs += [("oracle", "belady", None, "belady")]
        for fraction in tqdm(cfg.cache_fractions, desc=f"simulate batch {batch_size}", disable=not progress):
            capacity = max(1, round(fraction * layers * experts))
            group = []
            for policy, eviction_label, predictor_name, eviction in runs:
                sim = SimulationConfig(
                    policy=policy,
                    eviction=eviction,
                    capacity=capacity,
                    lookahead=cfg.lookahead,
                    budget=budget,
                    threshold=cfg.threshold,
                    oracle_lookahead=(reach or None) if policy == "oracle" else None,  # 0: one layer, none ahead
                )
                result = simulate(routing, profile, expert_bytes, sim, predicted.get(predictor_name)).summary()
                result.update(
                    policy=policy,
                    eviction=eviction_label,
                    predictor=predictor_name,
                    cache_fraction=fraction,
                    batch_size=batch_size,
                )
                group.append(result)
            floor = group[0]["total_s"]
            ceiling = group[-1]["total_s"]
            for result in group:
                result["speedup_vs_on_demand"] = floor / result["total_s"]
                result["oracle_gap_closed"] = (
                    (floor - result["total_s"]) / (floor - ceiling) if floor > ceiling else None
                )
            rows.extend(group)
    return {
        "simulated": True,
        "traces": str(store.directory),
        "model": store.manifest.model.id,
        "stack": stack,
        "num_layers": layers,
        "num_experts": experts,
        "top_k": top_k,
        "expert_bytes": expert_bytes,
        "hardware": profile.to_dict(),
        "split": cfg.split,
        "split_seed": cfg.split_seed,
        "max_windows": cfg.max_windows,
        "lookahead": cfg.lookahead,
        "oracle_lookahead": reach,
        "budget": budget,
        "rows": rows,
    }


def write_sweep(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps(report, indent=2))
