"""``specmoe simulate`` (a simulation: figures come from a cost model, not a measurement)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from specmoe.cli.params import default, option, parse_list, values_for
from specmoe.offload.policy import GAP_LEGEND, PrefetchSettings
from specmoe.offload.simulated.settings import HardwareSettings, SweepSettings
from specmoe.settings import validated
from specmoe.storage import atomic

H, S, P = HardwareSettings, SweepSettings, PrefetchSettings


def simulate_command(
    traces: Annotated[Path, typer.Option(help="Trace store directory.")],
    out: Annotated[Path, typer.Option(help="Output directory: simulation.json and speed_vs_memory.png.")],
    predictor_dir: Annotated[list[Path] | None, typer.Option(help="Saved predictor(s) to drive prefetch.")] = None,
    hardware: Annotated[str, option(H, "hardware")] = default(H, "hardware"),
    bandwidth_gbps: Annotated[float | None, option(H, "bandwidth_gbps")] = None,
    latency_us: Annotated[float | None, option(H, "latency_us")] = None,
    compute_ms: Annotated[float | None, option(H, "compute_ms")] = None,
    expert_bytes: Annotated[int | None, typer.Option(help="Bytes per expert (default: from the model config).")] = None,
    dtype: Annotated[str, typer.Option(help="Expert weight dtype, for the default expert size.")] = "bfloat16",
    cache_fractions: Annotated[str, option(S, "cache_fractions")] = default(S, "cache_fractions"),
    batch_sizes: Annotated[str, option(S, "batch_sizes")] = default(S, "batch_sizes"),
    max_windows: Annotated[int, option(S, "max_windows")] = default(S, "max_windows"),
    split: Annotated[str, option(S, "split")] = default(S, "split"),
    policies: Annotated[str, option(S, "predictor_policies", help="Policies run once per predictor.")] = default(
        S, "predictor_policies"
    ),
    layers_ahead: Annotated[int, option(P, "layers_ahead")] = default(P, "layers_ahead"),
    experts_per_layer: Annotated[int | None, option(P, "experts_per_layer")] = None,
    min_probability: Annotated[float, option(P, "min_probability")] = default(P, "min_probability"),
    eviction: Annotated[str, option(P, "eviction")] = default(P, "eviction"),
    oracle_reach: Annotated[int | None, option(P, "oracle_reach")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the document split.")] = 0,
) -> None:
    """SIMULATION of caches and prefetching.

    Recorded routing replayed through fast-tier caches and prefetch policies under a cost
    model: every figure is simulated."""
    from specmoe.models.loading import expert_nbytes
    from specmoe.offload.simulated.sweep import run_sweep, write_sweep
    from specmoe.predictors.base import load_predictor
    from specmoe.predictors.calibration import calibration_for
    from specmoe.report.plots import png_bytes, simulated_speed
    from specmoe.traces.store import TraceStore

    options = locals()
    machine = validated(HardwareSettings, values_for(HardwareSettings, options))
    sweep = validated(
        SweepSettings,
        {
            "cache_fractions": parse_list(cache_fractions, float, "--cache-fractions"),
            "batch_sizes": parse_list(batch_sizes, int, "--batch-sizes"),
            "max_windows": max_windows,
            "split": split,
            "prefetch": values_for(PrefetchSettings, options),
            "predictor_policies": tuple(p.strip() for p in policies.split(",") if p.strip()),
        },
    )
    store = TraceStore.open(traces)
    bytes_per_expert = expert_bytes or expert_nbytes(store.manifest.model.id, dtype)
    profile = machine.profile()
    predictors = {Path(d).name: load_predictor(d) for d in predictor_dir or []}
    calibrations = {
        name: calibration_for(predictors[name], d, store, split_seed=split_seed, log=typer.echo)
        for name, d in zip(predictors, predictor_dir or [])
    }
    report = run_sweep(
        traces, profile, bytes_per_expert, predictors, sweep, calibrations=calibrations, split_seed=split_seed
    )
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_sweep(report, out)
    atomic.write_bytes(out / "speed_vs_memory.png", png_bytes(simulated_speed(report)))
    typer.echo(f"SIMULATION ({profile.name}, {bytes_per_expert / 2**20:.2f} MiB/expert) -> {out}/simulation.json")
    typer.echo(
        f"{'batch':>5} {'cache':>6} {'policy':<36} {'tok/s':>9} {'stall ms/tok':>12} {'hit':>6} {'gap closed':>10} "
        f"{'LRU gap':>8}"
    )
    for r in report["rows"]:
        label = r["policy"] + (f":{r['predictor']}" if r["predictor"] else "")
        gap = "" if r["oracle_gap_closed"] is None else f"{r['oracle_gap_closed']:.3f}"
        lru_gap = "" if r["lru_gap_closed"] is None else f"{r['lru_gap_closed']:.3f}"
        typer.echo(
            f"{r['batch_size']:>5} {r['cache_fraction']:>6.2f} {label:<36} {r['tokens_per_s']:>9.1f} "
            f"{r['stall_ms_per_token']:>12.3f} {r['hit_rate']:>6.3f} {gap:>10} {lru_gap:>8}"
        )
    typer.echo("gap closed: the way from on-demand (0) to the oracle (1) in time per token; " + GAP_LEGEND)
