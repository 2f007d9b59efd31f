"""``specmoe bench ...``: benchmarks that write JSON."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from specmoe.bench.settings import ModelBenchSettings, OffloadBenchSettings
from specmoe.cli.params import default, option, parse_list, values_for
from specmoe.errors import InputError
from specmoe.offload.policy import GAP_LEGEND, PrefetchSettings
from specmoe.offload.settings import NextTokenSettings
from specmoe.settings import validated

app = typer.Typer(help="Benchmarks (write JSON).", no_args_is_help=True, rich_markup_mode=None)


@app.command("collect")
def bench_collect(
    model: Annotated[str, typer.Option(help="Model id, path or built-in name.")] = "switch-128e",
    max_tokens: Annotated[int, typer.Option(help="Tokens per measurement.")] = 16384,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 32,
    repeats: Annotated[int, typer.Option(help="Alternating hooked / plain passes.")] = 5,
    processes: Annotated[
        str | None,
        typer.Option(
            help="Process counts to compare, e.g. 1,2: each runs as a torchrun job sharing the machine's CPUs "
            "(or one GPU per process), in alternating rounds."
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="With --processes: launches per process count, interleaved.")] = 3,
    windows_per_shard: Annotated[
        int, typer.Option(help="With --processes: windows per shard, the unit shared out to the ranks.")
    ] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Collection throughput and recording overhead.

    Tokens/s of `specmoe collect`, and the overhead of its recording hooks against the plain
    forward pass; with --processes, how both scale over torchrun processes."""
    from specmoe.bench.collection import benchmark_collection
    from specmoe.bench.collection_scaling import benchmark_scaling
    from specmoe.cli.params import parse_list

    if processes is not None:
        result = benchmark_scaling(
            model,
            processes=parse_list(processes, int, "--processes"),
            rounds=rounds,
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            windows_per_shard=windows_per_shard,
            repeats=repeats,
        )
        result["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    else:
        result = benchmark_collection(
            model, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, repeats=repeats
        )
    text = json.dumps(result, indent=2)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    typer.echo(text)


@app.command("predictors")
def bench_predictors(
    traces: Annotated[Path, typer.Option(help="Trace store directory.")],
    json_out: Annotated[Path, typer.Option("--json", help="JSON output; a Markdown table goes beside it (.md).")],
    predictor: Annotated[list[str] | None, typer.Option(help="name[:preset], repeatable (default: all).")] = None,
    budget: Annotated[str, typer.Option(help="cpu (capped epochs/steps) or full.")] = "cpu",
    split_seed: Annotated[int, typer.Option(help="Seed of the document split.")] = 0,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples over documents for the 95% intervals.")] = 1000,
    save_dir: Annotated[Path | None, typer.Option(help="Also save every fitted predictor here.")] = None,
) -> None:
    """Train and score every predictor on one split.

    Every predictor on the same document split; JSON and a Markdown table beside it.
    Interrupted, it resumes on the same command: finished predictors wait in
    JSON.partial.jsonl."""
    from specmoe.bench.predictors import DEFAULT_PREDICTORS, benchmark_predictors, markdown_table, write_report
    from specmoe.bench.progress import discard, progress_file_for

    if budget not in ("cpu", "full"):
        raise InputError(f"--budget must be cpu or full, got {budget!r}")
    report = benchmark_predictors(
        traces,
        specs=tuple(predictor or DEFAULT_PREDICTORS),
        split_seed=split_seed,
        budget=budget,
        bootstrap=bootstrap,
        out_dir=save_dir,
        progress_file=progress_file_for(json_out),
    )
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_report(report, json_out)
    discard(progress_file_for(json_out))
    typer.echo(markdown_table(report))


@app.command("predictor-cost")
def bench_predictor_cost(
    traces: Annotated[Path, typer.Option(help="Trace store the predictors were fitted on (timed on its test split).")],
    predictor_dir: Annotated[list[Path], typer.Option(help="A saved predictor, repeatable.")],
    json_out: Annotated[Path, typer.Option("--json", help="JSON output; a Markdown table goes beside it (.md).")],
    model: Annotated[
        list[str] | None, typer.Option(help="Real models to count FLOPs for (default: those of configs/).")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes to time.")] = "1,16",
    rounds: Annotated[int, typer.Option(min=1, help="Timing rounds, each visiting every predictor.")] = 3,
) -> None:
    """Each predictor's CPU time and FLOPs per token.

    CPU time at batch 1 and 16, and FLOPs beside one MoE layer and the whole per-token
    compute of the real models."""
    from specmoe.bench.predictor_cost import benchmark_predictor_cost, markdown_table
    from specmoe.cli.params import parse_list
    from specmoe.models.shapes import PUBLISHED_CONFIGS

    report = benchmark_predictor_cost(
        traces,
        predictor_dir,
        models=tuple(model or PUBLISHED_CONFIGS),
        batch_sizes=tuple(parse_list(batch_sizes, int, "--batch-sizes")),
        rounds=rounds,
    )
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    json_out.with_suffix(".md").write_text(markdown_table(report))
    typer.echo(markdown_table(report))


B, P, N = OffloadBenchSettings, PrefetchSettings, NextTokenSettings


@app.command("offload")
def bench_offload(
    json_out: Annotated[Path, typer.Option("--json", help="Write rows here.")],
    traces: Annotated[
        Path | None,
        typer.Option(help="Replay: a trace store whose test split supplies the routing (experts: random, real shape)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Instead of --traces: decode this checkpoint for real, its experts offloaded, beside resident, "
            "accelerate and mmap runs under one memory limit (--policies may name those too)."
        ),
    ] = None,
    store: Annotated[Path | None, typer.Option(help="With --model: its expert store (default: the cache).")] = None,
    memory_limit: Annotated[
        str, typer.Option(help="With --model: auto (what offloading needs), none, or a size (8GiB) per run.")
    ] = "auto",
    prompt: Annotated[str, typer.Option(help="With --model: the text continued.")] = ModelBenchSettings().prompt,
    predictor_dir: Annotated[list[Path] | None, typer.Option(help="Routing predictors for prefetch.")] = None,
    expert_shape: Annotated[str, option(B, "expert_shape")] = default(B, "expert_shape"),
    tokens: Annotated[int, option(B, "tokens")] = default(B, "tokens"),
    warmup: Annotated[int, option(B, "warmup")] = default(B, "warmup"),
    repeats: Annotated[int, option(B, "repeats")] = default(B, "repeats"),
    cache_fractions: Annotated[str, option(B, "cache_fractions")] = default(B, "cache_fractions"),
    batch_sizes: Annotated[str, option(B, "batch_sizes")] = default(B, "batch_sizes"),
    policies: Annotated[str | None, option(B, "policies")] = None,
    planning: Annotated[str, option(B, "planning")] = default(B, "planning"),
    compute_cost: Annotated[str, option(B, "compute_cost")] = default(B, "compute_cost"),
    device: Annotated[str, option(B, "device")] = default(B, "device"),
    layers_ahead: Annotated[int, option(P, "layers_ahead")] = default(P, "layers_ahead"),
    experts_per_layer: Annotated[int | None, option(P, "experts_per_layer")] = None,
    min_probability: Annotated[float, option(P, "min_probability")] = default(P, "min_probability"),
    eviction: Annotated[str, option(P, "eviction")] = default(P, "eviction"),
    oracle_reach: Annotated[int | None, option(P, "oracle_reach")] = None,
    next_token_layer: Annotated[
        int | None,
        option(
            N,
            "layer",
            help="Also run prefetch+next-token: after this MoE layer, guess the next token from the residual "
            "stream (final norm + unembedding) and prefetch its first layers from a token table "
            "(decoder-only models; traces from `collect --generate --save-residuals`).",
        ),
    ] = None,
    next_token_depth: Annotated[int, option(N, "depth")] = default(N, "depth"),
    next_token_candidates: Annotated[int, option(N, "candidates")] = default(N, "candidates"),
    experts_dir: Annotated[Path | None, typer.Option(help="Where the expert files go (a real disk).")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the document split whose test part is replayed.")] = 0,
) -> None:
    """Measured offloaded decoding, policy by policy.

    With --traces: recorded routing replayed with experts of a real shape (random weights)
    read from this machine's disk. With --model: the checkpoint itself decoding, beside
    resident, accelerate and mmap runs under one memory limit. Interrupted, a --traces run
    resumes on the same command: finished runs wait in JSON.partial.jsonl."""
    from specmoe.bench.offload import benchmark_offload, offload_table
    from specmoe.bench.progress import discard, progress_file_for

    if (traces is None) == (model is None):
        raise InputError(
            "give --traces (replay recorded routing) or --model (decode a checkpoint), not both or neither"
        )
    options = locals()
    prefetch = values_for(PrefetchSettings, options)
    if model is not None:
        values = {"cache_fractions": parse_list(cache_fractions, float, "--cache-fractions"), "tokens": tokens}
        values |= {"warmup": max(warmup, 1), "repeats": repeats, "prompt": prompt, "memory_limit": memory_limit}
        values |= {"prefetch": prefetch} | ({"variants": _names(policies)} if policies else {})
        _model_offload(model, validated(ModelBenchSettings, values), predictor_dir, store, json_out)
        return
    next_token = values_for(NextTokenSettings, options) if next_token_layer is not None else None
    settings = validated(
        OffloadBenchSettings,
        {
            "expert_shape": parse_list(expert_shape, int, "--expert-shape", length=2),
            "tokens": tokens,
            "warmup": warmup,
            "repeats": repeats,
            "cache_fractions": parse_list(cache_fractions, float, "--cache-fractions"),
            "batch_sizes": parse_list(batch_sizes, int, "--batch-sizes"),
            "policies": None if policies is None else _names(policies),
            "planning": _names(planning),
            "compute_cost": _names(compute_cost),
            "device": device,
            "prefetch": prefetch,
            "next_token": next_token,
        },
    )
    report = benchmark_offload(
        traces,
        predictor_dir or [],
        settings,
        split_seed=split_seed,
        experts_dir=experts_dir,
        progress_file=progress_file_for(json_out),
    )
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    discard(progress_file_for(json_out))
    typer.echo(offload_table(report))
    typer.echo(GAP_LEGEND)


def _model_offload(model, settings, predictor_dirs, store, json_out: Path) -> None:
    from specmoe.bench.model_offload import benchmark_model_offload, model_table

    if predictor_dirs and len(predictor_dirs) > 1:
        raise InputError("with --model, give one --predictor-dir")
    report = benchmark_model_offload(
        model, settings, predictor_dir=predictor_dirs[0] if predictor_dirs else None, store=store
    )
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    typer.echo(model_table(report))


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


@app.command("expert-reads")
def bench_expert_reads(
    model: Annotated[str, typer.Option(help="Checkpoint (hub id, local directory or built-in name).")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the result here.")],
    store: Annotated[Path | None, typer.Option(help="Its expert store (default: the cache).")] = None,
    experts: Annotated[int, typer.Option(min=1, help="Experts read per pass, in random order, none twice.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Passes per source, the sources interleaved.")] = 3,
) -> None:
    """Expert reads: the store against the checkpoint.

    Milliseconds per expert read from the aligned expert store and straight from the
    checkpoint's safetensors: which source offloaded runs should read from here."""
    from specmoe.bench.model_offload import compare_expert_reads

    result = compare_expert_reads(model, store=store, experts=experts, repeats=repeats)
    result["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps(result["sources"], indent=1))
