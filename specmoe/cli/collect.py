"""``specmoe collect``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def collect_command(
    model: Annotated[
        str,
        typer.Option(
            help="Hugging Face hub id, local checkpoint directory, or built-in model name (see `specmoe models list`)."
        ),
    ],
    text: Annotated[
        list[str],
        typer.Option(
            help="Text source: .txt, .jsonl[.gz] or .parquet file, or 'builtin' for the shipped corpus. Repeatable."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Output trace store directory. Rerunning the same command resumes an interrupted run.")
    ],
    max_tokens: Annotated[int | None, typer.Option(help="Stop after about this many tokens.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per window; windows never cross documents.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 32,
    windows_per_shard: Annotated[
        int | None,
        typer.Option(
            help="Windows per shard, the unit of resumption: a kill loses the shard in flight. "
            "Default: a resumed store's own; for a new one 256, or with --generate one batch "
            "(--batch-size)."
        ),
    ] = None,
    save_router_inputs: Annotated[
        bool, typer.Option(help="Also store the hidden state entering each router (fp16, in separate files).")
    ] = False,
    save_residuals: Annotated[
        bool, typer.Option(help="Also store the residual stream leaving each MoE block (fp16, separate files).")
    ] = False,
    generate: Annotated[
        int,
        typer.Option(
            help="Decode mode (decoder-only models): keep each window's first seq-len minus N tokens as a "
            "prompt and record the model continuing it greedily for N tokens, one token per step "
            "through its KV cache. What a decode benchmark should replay. 0: prefill the text."
        ),
    ] = 0,
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Model dtype: float32, bfloat16 or float16 (default: float32; with --fast-tier, the checkpoint's)."
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(help="cpu, cuda, cuda:N, or auto: this process's GPU (its LOCAL_RANK under torchrun) if any."),
    ] = "auto",
    device_map: Annotated[
        str | None,
        typer.Option(
            help="Spread a model larger than one device over this process's GPUs, CPU memory and disk "
            "(accelerate): auto, balanced, balanced_low_0 or sequential."
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(help="With --device-map: budget per device, e.g. gpu=70GiB,cpu=200GiB or 0=70GiB,1=40GiB."),
    ] = None,
    offload_folder: Annotated[
        Path | None, typer.Option(help="With --device-map: where weights that fit on no device are kept.")
    ] = None,
    fast_tier: Annotated[
        str | None,
        typer.Option(
            help="For a model larger than memory: load it without its routed experts and read them from its "
            "expert store (see `specmoe prepare`), with this much memory for them (25%, 4GiB). Slower."
        ),
    ] = None,
    store: Annotated[
        Path | None,
        typer.Option(help="With --fast-tier: the expert store to read (default: the cache, written if missing)."),
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the checkpoint repository.")] = False,
) -> None:
    """Record which experts every token was routed to.

    Runs an MoE model over text and writes a resumable trace store.

    Under torchrun (`torchrun --nproc-per-node N -m specmoe collect ...`) the shards are shared
    out over the N processes; the store is the one a single process would write."""
    import dataclasses

    import torch

    from specmoe.corpus.builtin import check_text_sources
    from specmoe.errors import InputError
    from specmoe.traces.collector import CollectConfig, collect
    from specmoe.traces.stats import store_summary

    cfg = CollectConfig(
        model=model,
        texts=text,
        out=out,
        max_tokens=max_tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        windows_per_shard=windows_per_shard,
        save_router_inputs=save_router_inputs,
        save_residuals=save_residuals,
        generate=generate,
        dtype=dtype or "float32",
        trust_remote_code=trust_remote_code,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
    )
    check_text_sources(text)
    runtime = None
    if store is not None and fast_tier is None:
        raise InputError("--store applies to --fast-tier (a model read from its expert store); add --fast-tier")
    if fast_tier is not None:
        from specmoe.offload.live.runtime import OffloadRuntime
        from specmoe.offload.settings import TierSize
        from specmoe.torchrun import world_size

        if world_size() > 1 or device_map is not None:
            raise InputError("--fast-tier runs one process on one device: without torchrun and --device-map")
        size = TierSize.parse(fast_tier)
        runtime = OffloadRuntime.from_checkpoint(
            model, size, store=store, dtype=dtype, trust_remote_code=trust_remote_code, log=typer.echo, policy="lru"
        )
        typer.echo(
            f"experts offloaded: {runtime.session.tier.budget / 2**20:.0f} MiB of them in memory, the rest read from disk"
        )
        # the checkpoint's dtype unless --dtype says otherwise: what the traces are computed in
        cfg = dataclasses.replace(cfg, dtype=str(runtime.loaded.model.dtype).removeprefix("torch."))
    try:
        store = collect(cfg, loaded=runtime.loaded if runtime is not None else None)
    finally:
        if runtime is not None:
            runtime.close()
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return  # rank 0 reports for the job
    summary = store_summary(store, with_statistics=False)
    typer.echo(
        f"wrote {summary['num_tokens']} tokens from {summary['num_documents']} documents in "
        f"{summary['num_shards']} shards to {out}"
    )
