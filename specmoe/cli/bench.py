"""``specmoe bench ...``: benchmarks that write JSON."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Benchmarks (write JSON).", no_args_is_help=True)


@app.command("collect")
def bench_collect(
    model: Annotated[str, typer.Option(help="Model id, path or built-in name.")] = "switch-128e",
    max_tokens: Annotated[int, typer.Option(help="Tokens per measurement.")] = 16384,
    seq_len: Annotated[int, typer.Option()] = 128,
    batch_size: Annotated[int, typer.Option()] = 32,
    repeats: Annotated[int, typer.Option(help="Alternating hooked / plain passes.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the result here.")] = None,
) -> None:
    """Collection throughput, and the overhead of recording hooks versus the plain forward pass."""
    from specmoe.bench.collection import benchmark_collection

    result = benchmark_collection(model, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, repeats=repeats)
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
    split_seed: Annotated[int, typer.Option()] = 0,
    bootstrap: Annotated[int, typer.Option()] = 1000,
    save_dir: Annotated[Path | None, typer.Option(help="Also save every fitted predictor here.")] = None,
) -> None:
    """Train and score every predictor on the same document split; JSON + Markdown table.
    Interrupted, it resumes on the same command: finished predictors wait in JSON.partial.jsonl."""
    from specmoe.bench.predictors import DEFAULT_PREDICTORS, benchmark_predictors, markdown_table, write_report
    from specmoe.bench.progress import discard, progress_file_for
    from specmoe.errors import InputError

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
    """Each predictor's CPU time per token at batch 1 and 16, and its FLOPs beside one MoE layer
    and the whole per-token compute of the real models."""
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


@app.command("offload")
def bench_offload(
    traces: Annotated[Path, typer.Option(help="Trace store whose test split supplies the routing.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write rows here.")],
    predictor_dir: Annotated[list[Path] | None, typer.Option(help="Routing predictors for prefetch.")] = None,
    expert_shape: Annotated[
        str, typer.Option(help="hidden,ffn of a real model's expert (OLMoE-1B-7B: 2048,1024).")
    ] = "2048,1024",
    tokens: Annotated[int, typer.Option(help="Decode steps replayed.")] = 48,
    cache_fractions: Annotated[str, typer.Option()] = "0.1,0.25,0.5",
    lookahead: Annotated[int, typer.Option(help="Prefetch layers l+1..l+H.")] = 1,
    budget: Annotated[int | None, typer.Option(help="Experts per target layer to prefetch (default 2k).")] = None,
    threshold: Annotated[float, typer.Option(help="Minimum predicted probability to prefetch.")] = 0.0,
    repeats: Annotated[int, typer.Option(help="Runs per configuration, in shuffled order; the median is kept.")] = 3,
    experts_dir: Annotated[Path | None, typer.Option(help="Where the expert files go (a real disk).")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the document split whose test part is replayed.")] = 0,
    warmup: Annotated[int, typer.Option(min=0, help="Decode steps before the clock starts (they fill the cache).")] = 0,
    device: Annotated[
        str, typer.Option(help="cpu: experts on disk, cache in RAM. cuda: experts in pinned RAM, cache on the GPU.")
    ] = "cpu",
    oracle_lookahead: Annotated[
        int | None,
        typer.Option(help="Layers the oracle reads ahead in decode order, into the next token (default: L-1)."),
    ] = None,
    planning: Annotated[
        str,
        typer.Option(
            help="background: plans run on the prefetch thread. inline: on the decoding thread. Both "
            "(background,inline): each prefetch run once per mode, interleaved, to compare them in one pass."
        ),
    ] = "background",
    policies: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of on-demand,lru,lfu,lrfu,belady,prefetch,prefetch+next-token,"
            "oracle-prefetch,oracle (default: all). oracle-prefetch: the recorded future, evicted by "
            "--prefetch-eviction; oracle: evicted by it (Belady)."
        ),
    ] = None,
    prefetch_eviction: Annotated[
        str, typer.Option(help="Eviction with prefetch and oracle-prefetch: lru, lfu, lrfu or belady.")
    ] = "lru",
    next_token_layer: Annotated[
        int | None,
        typer.Option(
            help="Also run prefetch+next-token: after this MoE layer, guess the next token from the residual "
            "stream (final norm + unembedding) and prefetch its first layers from a token table "
            "(decoder-only models; traces from `collect --generate --save-residuals`)."
        ),
    ] = None,
    next_token_depth: Annotated[int, typer.Option(help="How many of the next token's first layers to prefetch.")] = 1,
    next_token_candidates: Annotated[
        int, typer.Option(help="Guessed tokens whose experts are pooled, weighted by probability.")
    ] = 1,
) -> None:
    """Measured tokens/s per policy: real recorded routing, experts of a real shape in a slow tier.
    Interrupted, it resumes on the same command: finished runs wait in JSON.partial.jsonl."""
    from specmoe.bench.offload import benchmark_offload
    from specmoe.bench.progress import discard, progress_file_for
    from specmoe.cli.params import parse_list

    hidden, ffn = parse_list(expert_shape, int, "--expert-shape", length=2)
    report = benchmark_offload(
        traces,
        predictor_dirs=predictor_dir or [],
        hidden=hidden,
        ffn=ffn,
        tokens=tokens,
        cache_fractions=parse_list(cache_fractions, float, "--cache-fractions"),
        lookahead=lookahead,
        experts_dir=experts_dir,
        repeats=repeats,
        split_seed=split_seed,
        warmup=warmup,
        device=device,
        budget=budget,
        threshold=threshold,
        oracle_lookahead=oracle_lookahead,
        planning=tuple(mode.strip() for mode in planning.split(",")),
        prefetch_eviction=prefetch_eviction,
        next_token_layer=next_token_layer,
        next_token_depth=next_token_depth,
        next_token_candidates=next_token_candidates,
        progress_file=progress_file_for(json_out),
        policies=None if policies is None else tuple(name.strip() for name in policies.split(",") if name.strip()),
    )
    report["command"] = "specmoe " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2))
    discard(progress_file_for(json_out))
    typer.echo(
        f"{'cache':>6} {'policy':<32} {'tok/s':>8} {'ms/tok':>8} {'stall':>6} {'hit':>6} {'MB read':>9} {'of oracle':>9} {'predict':>7} {'pr. CPU':>7} {'bg CPU':>7}"
    )
    for r in report["rows"]:
        label = r["policy"] + (f":{r['predictor']}" if r["predictor"] else "")
        label += (
            f"/{r['eviction']}" if r["policy"].startswith(("prefetch", "oracle-")) and r["eviction"] != "lru" else ""
        )
        label += "/inline" if r.get("planning") == "inline" else ""
        typer.echo(
            f"{r['cache_fraction']:>6.2f} {label:<32} {r['tokens_per_s']:>8.2f} {r['time_per_token_ms']:>8.1f} "
            f"{r['stall_fraction']:>6.3f} {r['hit_rate']:>6.3f} {r['bytes_read'] / 2**20:>9.1f} "
            f"{_ratio(r['fraction_of_oracle']):>9} {r['predictor_fraction']:>7.2%} {r['predictor_cpu_fraction']:>7.2%} "
            f"{r['predictor_background_cpu_fraction']:>7.2%}"
        )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
