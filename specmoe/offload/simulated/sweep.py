"""``specmoe simulate``: every policy over fast-tier sizes and batch sizes.

Everything here is a SIMULATION under a cost model; rows carry ``"simulated": true`` and
the plot says so in its title.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from specmoe.errors import InputError
from specmoe.evaluation.evaluate import dataset_for
from specmoe.offload.policy import POLICIES, lru_gap_closed, predictors_for
from specmoe.offload.simulated.cost import HardwareProfile
from specmoe.offload.simulated.decode_order import decode_order
from specmoe.offload.simulated.settings import SweepSettings
from specmoe.offload.simulated.simulator import SimulationConfig, capacity_bytes, plan_forecasts, simulate
from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.calibration import Calibration
from specmoe.predictors.data import TraceDataset
from specmoe.traces.store import TraceStore


def run_sweep(
    traces: str | Path,
    profile: HardwareProfile,
    expert_bytes: int,
    predictors: dict[str, ExpertPredictor],
    cfg: SweepSettings | None = None,
    *,
    calibrations: dict[str, Calibration] | None = None,
    split_seed: int = 0,
    progress: bool = True,
) -> dict:
    """Every policy of ``cfg`` at every fast-tier size and batch size; each of
    ``cfg.predictor_policies`` once per predictor, with its calibration if given."""
    cfg = cfg or SweepSettings()
    calibrations = calibrations or {}
    store = TraceStore.open(traces)
    stack = store.default_stack()
    layers = store.manifest.model.stacks[stack].num_layers
    experts = store.manifest.model.num_experts
    top_k = store.manifest.model.top_k
    prefetch = cfg.prefetch.resolve(top_k=top_k, num_layers=layers)
    pairs = _pairs(cfg.predictor_policies, predictors)
    rows = []
    for batch_size in cfg.batch_sizes:
        base = TraceDataset(store, cfg.split, seed=split_seed)
        order = decode_order(base, batch_size=batch_size, max_windows=cfg.max_windows)
        plans, after_output = {}, {}
        for name, predictor in predictors.items():
            data = dataset_for(predictor, store, cfg.split, split_seed, base.splits)
            probs = decode_order(
                data, predictor, batch_size=batch_size, horizons=predictor.horizons, max_windows=cfg.max_windows
            ).probs
            calibrate = calibrations[name].apply if name in calibrations else None
            for policy in {policy for policy, predictor_name in pairs if predictor_name == name}:
                rule = POLICIES[policy]
                settings = rule.resolve(cfg.prefetch, top_k=top_k, num_layers=layers)
                plans[policy, name] = plan_forecasts(probs, settings, rule, calibrate)
            after_output[name] = predictor.needs_hidden == "residual_out"
        runs = [("on-demand", None), *((name, None) for name in cfg.cache_policies), *pairs, ("oracle", None)]
        for fraction in tqdm(cfg.cache_fractions, desc=f"simulate batch {batch_size}", disable=not progress):
            capacity = capacity_bytes(fraction, layers, experts, expert_bytes)
            group = []
            for policy, predictor_name in runs:
                sim = SimulationConfig(
                    policy=policy,
                    capacity_bytes=capacity,
                    prefetch=cfg.prefetch,
                    plans_after_output=after_output.get(predictor_name, False),
                )
                result = simulate(
                    order.routing,
                    profile,
                    expert_bytes,
                    sim,
                    plans.get((policy, predictor_name)),
                    token_ids=order.token_ids,
                    sequences=order.sequences,
                ).summary()
                result.update(
                    policy=policy,
                    eviction=result["config"]["eviction"],
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
            lru_gap_closed(group, lambda r: r["stall_s"])
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
        "split_seed": split_seed,
        "max_windows": cfg.max_windows,
        "prefetch": prefetch.model_dump(),
        "rows": rows,
    }


def _pairs(entries: tuple[str, ...], predictors: dict) -> list[tuple[str, str]]:
    """(policy, predictor name) of every run with a predictor: each ``policy:name`` entry
    with that predictor, each plain policy with the one it was built around where given,
    else with each."""
    names, pairs = list(predictors), []
    for entry in entries:
        policy, _, wanted = entry.partition(":")
        if wanted:
            if wanted not in predictors:
                raise InputError(f"--predictor-policies {entry}: no --predictor-dir is called {wanted!r}")
            pairs.append((policy, wanted))
        else:
            pairs += [
                (policy, names[i]) for i in predictors_for(POLICIES[policy], [p.name for p in predictors.values()])
            ]
    return pairs


def write_sweep(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulation.json").write_text(json.dumps(report, indent=2))
