"""Collection throughput and the cost of the recording hooks (``specmoe bench collect``).

Hooked and plain passes alternate over identical batches, so drift in machine load hits
both; the overhead is the ratio of medians. End-to-end throughput is a real ``collect``
run (tokenisation, forward, Parquet writing) into the project's temporary directory.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

import specmoe
from specmoe.models.loading import LoadedModel, load_model
from specmoe.storage.scratch import scratch_dir
from specmoe.traces.batches import batch_tensors, run_batch
from specmoe.traces.collector import CollectConfig, collect
from specmoe.traces.recorder import RoutingRecorder
from specmoe.traces.windows import limit_tokens, plan_windows


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_passes(loaded: LoadedModel, batches: list, pad_id: int):
    """Two callables over the same batches: the plain forward pass, and the one ``collect``
    makes (recording hooks, routing copied out as numpy)."""

    def plain():
        for batch in batches:
            with torch.no_grad():
                loaded.adapter.forward(loaded.model, *batch_tensors(batch, pad_id))

    def hooked():
        with RoutingRecorder(loaded) as recorder:
            for batch in batches:
                records, keep = run_batch(loaded, recorder, batch, pad_id)
                for record in records.values():
                    record.expert_ids[keep].numpy(), record.gate_weights[keep].numpy()

    return plain, hooked


def benchmark_collection(
    model: str, *, max_tokens: int, seq_len: int, batch_size: int, repeats: int, text: str = "builtin"
) -> dict:
    loaded = load_model(model)
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = list(limit_tokens(plan_windows([text], tokenizer, seq_len), max_tokens))
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    tokens = sum(len(w.token_ids) for w in windows)
    plain, hooked = forward_passes(loaded, batches, pad_id)
    plain()  # warm-up
    plain_s, hooked_s = [], []
    for _ in range(repeats):
        plain_s.append(timed(plain))
        hooked_s.append(timed(hooked))
    with scratch_dir("bench-collect") as tmp:
        cfg = CollectConfig(
            model=model,
            texts=[text],
            out=Path(tmp) / "traces",
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
            progress=False,
        )
        end_to_end = timed(lambda: collect(cfg, loaded))
    plain_med, hooked_med = statistics.median(plain_s), statistics.median(hooked_s)
    return {
        "benchmark": "collect",
        "model": model,
        "tokens": tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "repeats": repeats,
        "plain_forward_s": plain_s,
        "hooked_forward_s": hooked_s,
        "plain_tokens_per_s": round(tokens / plain_med, 1),
        "hooked_tokens_per_s": round(tokens / hooked_med, 1),
        "hook_overhead_fraction": round(hooked_med / plain_med - 1, 4),
        "end_to_end_tokens_per_s": round(tokens / end_to_end, 1),
        "machine": machine_info(),
        "specmoe_version": specmoe.__version__,
        "command": f"specmoe bench collect --model {model} --max-tokens {max_tokens} --seq-len {seq_len} "
        f"--batch-size {batch_size} --repeats {repeats}",
    }
