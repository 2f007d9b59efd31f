"""``specmoe serve``: generate with experts offloaded to disk and a predictor prefetching."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from specmoe.cli.params import default, option, values_for
from specmoe.offload.policy import PrefetchSettings, policy_named
from specmoe.offload.settings import NextTokenSettings, TierSize
from specmoe.settings import validated

P, N = PrefetchSettings, NextTokenSettings


def serve_command(
    model: Annotated[str, typer.Option(help="Hub id, local checkpoint directory or built-in model name.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    fast_tier: Annotated[
        str,
        typer.Option(help="Memory for routed experts: a fraction of all of them (25%, 0.25) or a size (512MiB, 2GB)."),
    ],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate greedily.")] = 32,
    predictor_dir: Annotated[Path | None, typer.Option(help="Routing predictor that drives prefetch.")] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help="Offload policy (docs/offloading.md), e.g. lfu, cost-aware+next-use, cost-aware+recurrence; "
            "default: prefetch with --predictor-dir, else a cache evicting by --eviction."
        ),
    ] = None,
    predictor_stack: Annotated[
        str | None,
        typer.Option(help="Stack the predictor was fitted on (encoder-decoder models); default: the first."),
    ] = None,
    layers_ahead: Annotated[int, option(P, "layers_ahead")] = default(P, "layers_ahead"),
    experts_per_layer: Annotated[int | None, option(P, "experts_per_layer")] = None,
    min_probability: Annotated[float, option(P, "min_probability")] = default(P, "min_probability"),
    eviction: Annotated[str, option(P, "eviction", help="Eviction policy of the fast tier: lru, lfu or lrfu.")] = "lru",
    next_token_layer: Annotated[
        int | None,
        option(
            N,
            "layer",
            help="After this MoE layer, guess the next token (final norm + unembedding on the residual "
            "stream) and prefetch its first layers; --predictor-dir must be a token table. Decoder-only models.",
        ),
    ] = None,
    next_token_depth: Annotated[int, option(N, "depth")] = default(N, "depth"),
    next_token_candidates: Annotated[int, option(N, "candidates")] = default(N, "candidates"),
    store: Annotated[
        Path | None,
        typer.Option(help="The expert store to read experts from (default: the cache; see `specmoe prepare`)."),
    ] = None,
    expert_source: Annotated[
        str,
        typer.Option(
            help="store: an aligned expert store, written on the first run (`specmoe prepare`). checkpoint: "
            "the checkpoint's own safetensors files, read at each expert's byte ranges; no store."
        ),
    ] = "store",
    dtype: Annotated[
        str | None, typer.Option(help="float32, bfloat16 or float16 (default: the checkpoint's own).")
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="cpu: the fast tier in RAM. cuda: the fast tier in GPU memory, copies on their own stream."),
    ] = "cpu",
    host_cache: Annotated[
        str | None,
        typer.Option(
            help="With --device cuda: a middle tier of this many experts in pinned host memory (25%, 8GiB), "
            "between the disk and the GPU."
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run the checkpoint's own Python code (only for checkpoints you trust).")
    ] = False,
) -> None:
    """Generate with a model whose experts stay on disk.

    Greedy generation: everything but the routed experts is loaded
    (never the experts), and a byte-budgeted fast tier holds the experts decoding needs, read
    with the page cache bypassed and prefetched by a predictor; prints the text and the
    runtime's counters (to stderr, as JSON)."""
    import torch

    from specmoe.errors import InputError
    from specmoe.memory import peak_rss_bytes
    from specmoe.offload.live.runtime import OffloadRuntime
    from specmoe.predictors.base import load_predictor

    options = locals()
    size = TierSize.parse(fast_tier)
    if policy is not None:
        policy_named(policy)  # an unknown name is refused before the model loads
    prefetch = validated(PrefetchSettings, values_for(PrefetchSettings, options))
    next_token = None
    if next_token_layer is not None:
        next_token = validated(NextTokenSettings, values_for(NextTokenSettings, options))
    predictor = load_predictor(predictor_dir) if predictor_dir else None
    host_cache_bytes = None
    if host_cache is not None:
        if not device.startswith("cuda"):
            raise InputError(
                "--host-cache is the middle tier of a GPU run: on --device cpu the fast tier is host memory"
            )
        host_cache_bytes = TierSize.parse(host_cache, "--host-cache")
    runtime = OffloadRuntime.from_checkpoint(
        model,
        size,
        store=store,
        expert_source=expert_source,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        log=typer.echo,
        device=device,
        predictor=predictor,
        policy=policy,
        predictor_stack=predictor_stack,
        prefetch=prefetch,
        next_token=next_token,
        host_cache=host_cache_bytes,
    )
    loaded, offloaded = runtime.loaded, runtime.offloaded
    try:
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to(runtime.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
    finally:
        runtime.close()
    # A decoder-only model returns prompt + continuation; an encoder-decoder's decoder starts
    # from its own start token.
    new = out[0, 1:] if loaded.model.config.is_encoder_decoder else out[0, ids.shape[1] :]
    typer.echo(loaded.tokenizer.decode(new, skip_special_tokens=True))
    stats = runtime.results() | {
        "fast_tier_bytes": runtime.session.tier.budget,
        "non_expert_bytes": offloaded.non_expert_nbytes(),
        "expert_source": str(getattr(runtime.transfer.slow, "directory", offloaded.checkpoint.directory)),
        "peak_rss_bytes": peak_rss_bytes(),
        "tokens": len(new),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(len(new) / seconds, 2),
    }
    if runtime.next_token is not None:  # step s guessed generated token s (step 0: the prompt)
        chosen = new.tolist()
        judged = [guesses[0] == chosen[step] for step, guesses in runtime.guess_log if step < len(chosen)]
        stats["next_token_guesses"] = len(judged)
        stats["next_token_guess_accuracy"] = sum(judged) / len(judged) if judged else None
    typer.echo(json.dumps(stats), err=True)
