"""``specmoe simulate`` (a simulation: figures come from a cost model, not a measurement)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def simulate_command(
    traces: Annotated[Path, typer.Option(help="Trace store directory (its test split is replayed).")],
    out: Annotated[Path, typer.Option(help="Output directory: simulation.json and speed_vs_memory.png.")],
    predictor_dir: Annotated[list[Path] | None, typer.Option(help="Saved predictor(s) to drive prefetch.")] = None,
    hardware: Annotated[str, typer.Option(help="pcie4, pcie5, nvme, or measured (this machine's disk).")] = "pcie4",
    bandwidth_gbps: Annotated[float | None, typer.Option(help="Override link bandwidth, GB/s.")] = None,
    latency_us: Annotated[float | None, typer.Option(help="Override per-transfer latency, µs.")] = None,
    compute_ms: Annotated[float | None, typer.Option(help="Override compute per MoE layer, ms.")] = None,
    expert_bytes: Annotated[int | None, typer.Option(help="Bytes per expert (default: from the model config).")] = None,
    dtype: Annotated[str, typer.Option(help="Expert weight dtype, for the default expert size.")] = "bfloat16",
    cache_fractions: Annotated[str, typer.Option(help="Fast-tier sizes as fractions of all experts.")] = "0.1,0.25,0.5",
    batch_sizes: Annotated[str, typer.Option(help="Decode batch sizes.")] = "1",
    lookahead: Annotated[int, typer.Option(help="Prefetch horizon H.")] = 1,
    budget: Annotated[int | None, typer.Option(help="Experts per target layer to prefetch (default 2k).")] = None,
    threshold: Annotated[float, typer.Option(help="Minimum predicted probability to prefetch.")] = 0.0,
    prefetch_eviction: Annotated[str, typer.Option(help="Eviction policy used with prefetch.")] = "lru",
    max_windows: Annotated[int, typer.Option(help="Sequences replayed from the split.")] = 64,
    split: Annotated[str, typer.Option(help="Split the sequences come from: train, val or test.")] = "test",
    split_seed: Annotated[int, typer.Option()] = 0,
    oracle_lookahead: Annotated[
        int | None,
        typer.Option(help="Layers the oracle reads ahead in decode order, into the next token (default: L-1)."),
    ] = None,
) -> None:
    """SIMULATION: replay recorded routing through fast-tier caches and prefetch policies."""
    from specmoe.cli.params import parse_list
    from specmoe.offload.cost import expert_bytes as expert_size
    from specmoe.offload.cost import measured_profile, preset
    from specmoe.offload.sweep import SweepConfig, run_sweep, write_sweep
    from specmoe.predictors.base import load_predictor
    from specmoe.report.plots import png_bytes, simulated_speed
    from specmoe.traces.store import TraceStore

    if split not in ("train", "val", "test"):
        raise typer.BadParameter(f"must be train, val or test, got {split!r}", param_hint="--split")
    store = TraceStore.open(traces)
    bytes_per_expert = expert_bytes or expert_size(store.manifest.model.id, dtype)
    if hardware == "measured":
        profile = measured_profile((compute_ms or 0.25) / 1e3)
    else:
        profile = preset(
            hardware,
            bandwidth_bytes_per_s=None if bandwidth_gbps is None else bandwidth_gbps * 1e9,
            latency_s=None if latency_us is None else latency_us / 1e6,
            compute_s_per_layer=None if compute_ms is None else compute_ms / 1e3,
        )
    predictors = {Path(d).name: load_predictor(d) for d in predictor_dir or []}
    cfg = SweepConfig(
        cache_fractions=parse_list(cache_fractions, float, "--cache-fractions"),
        batch_sizes=parse_list(batch_sizes, int, "--batch-sizes"),
        lookahead=lookahead,
        budget=budget,
        threshold=threshold,
        prefetch_eviction=prefetch_eviction,
        max_windows=max_windows,
        split=split,
        split_seed=split_seed,
        oracle_lookahead=oracle_lookahead,
    )
    report = run_sweep(traces, profile, bytes_per_expert, predictors, cfg)
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_sweep(report, out)
    (out / "speed_vs_memory.png").write_bytes(png_bytes(simulated_speed(report)))
    typer.echo(f"SIMULATION ({profile.name}, {bytes_per_expert / 2**20:.2f} MiB/expert) -> {out}/simulation.json")
    typer.echo(f"{'batch':>5} {'cache':>6} {'policy':<28} {'tok/s':>9} {'stall':>6} {'hit':>6} {'gap closed':>10}")
    for r in report["rows"]:
        label = r["policy"] + (f":{r['predictor']}" if r["predictor"] else f":{r['eviction']}")
        gap = "" if r["oracle_gap_closed"] is None else f"{r['oracle_gap_closed']:.3f}"
        typer.echo(
            f"{r['batch_size']:>5} {r['cache_fraction']:>6.2f} {label:<28} {r['tokens_per_s']:>9.1f} "
            f"{r['stall_fraction']:>6.3f} {r['hit_rate']:>6.3f} {gap:>10}"
        )
