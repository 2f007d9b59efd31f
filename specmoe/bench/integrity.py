"""What checking trace data on read costs (``scripts/bench-verification.py``).

Each pass reads every shard of a store the way a consumer does, in three variants
interleaved pass by pass so machine drift hits all of them alike:

- ``unchecked``: the decoding of before the checks (memory-mapped Parquet, safetensors opened
  as they are), nothing verified;
- ``checked``: :meth:`TraceStore.read_shard` and :meth:`TraceStore.hidden_states` as every
  command now reads them (routing bytes hashed each read, hidden states through their
  verified markers, values range-checked);
- ``first_read``: the same after the markers are dropped, so every hidden-state file is hashed
  whole (what the first read after a copy or an edit costs).

:func:`consumer_overhead` puts that into proportion: a real consumer (fit a predictor on the
train split and score it on val, as ``specmoe train`` does) with the store's reads as they are,
against the same with the unchecked decoding patched in, interleaved.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import specmoe
from specmoe.storage.integrity import sha256_file
from specmoe.traces.store import VERIFIED_MARKER, ShardData, TraceStore


def _unchecked_read_shard(self: TraceStore, index: int, stack: str | None = None) -> ShardData:
    """``read_shard`` as it was before the checks: memory-mapped Parquet, nothing verified."""
    stack = stack or self.default_stack()
    grids = [f"{stack}.expert_ids", f"{stack}.gate_weights"]
    table = pq.read_table(
        self.path_of(self.manifest.shards[index].routing),
        columns=["doc_id", "doc_group", "window", "position", "token_id", *grids],
        memory_map=True,
    )
    shape = (table.num_rows, self.manifest.model.stacks[stack].num_layers, self.manifest.model.top_k)

    def grid(name, dtype):
        return table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(shape)

    return ShardData(
        doc_ids=table.column("doc_id").to_numpy(zero_copy_only=False).astype(object),
        doc_groups=table.column("doc_group").to_numpy(zero_copy_only=False).astype(object),
        windows=table.column("window").to_numpy(),
        positions=table.column("position").to_numpy(),
        token_ids=table.column("token_id").to_numpy(),
        expert_ids=grid(grids[0], np.int16),
        gate_weights=grid(grids[1], np.float32),
    )


def _unchecked_hidden_states(self: TraceStore, index: int, kind: str = "router_input", stack: str | None = None):
    from safetensors import safe_open

    with safe_open(str(self.path_of(self.manifest.shards[index].hidden[kind])), framework="pt") as handle:
        return handle.get_tensor(stack or self.default_stack())


def _fit_and_score(directory: Path, predictor: str) -> None:
    from specmoe.evaluation.evaluate import dataset_for
    from specmoe.predictors.registry import make_predictor

    model = make_predictor(predictor)
    train = dataset_for(model, TraceStore.open(directory), "train", 0)
    model.fit(train, train.with_split("val"))
    model.score(train.with_split("val"))


def consumer_overhead(traces: str | Path, predictors: list[str], *, repeats: int = 3) -> dict:
    """Seconds of fit-and-score per predictor, checked and unchecked reads interleaved."""
    from unittest import mock

    directory = Path(traces)
    results = {}
    for predictor in predictors:
        times: dict[str, list[float]] = {"unchecked": [], "checked": []}
        run = partial(_fit_and_score, directory, predictor)
        run()  # warm the page cache and any lazy imports
        for repeat in range(repeats):
            for variant in ("unchecked", "checked")[:: 1 if repeat % 2 == 0 else -1]:  # ABBA: drift hits both
                with ExitStack() as patches:
                    if variant == "unchecked":
                        patches.enter_context(mock.patch.object(TraceStore, "read_shard", _unchecked_read_shard))
                        patches.enter_context(mock.patch.object(TraceStore, "hidden_states", _unchecked_hidden_states))
                    times[variant].append(_timed(run))
        results[predictor] = {
            **{name: _summary(seconds) for name, seconds in times.items()},
            "overhead_fraction": round(
                statistics.median(times["checked"]) / statistics.median(times["unchecked"]) - 1, 4
            ),
        }
    return results


def _unchecked_pass(store: TraceStore, stack: str, kinds: list[str]) -> None:
    from safetensors import safe_open

    grids = [f"{stack}.expert_ids", f"{stack}.gate_weights"]
    columns = ["doc_id", "doc_group", "window", "position", "token_id", *grids]
    for shard in store.manifest.shards:
        table = pq.read_table(store.path_of(shard.routing), columns=columns, memory_map=True)
        for name in grids:
            table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        for kind in kinds:
            with safe_open(str(store.path_of(shard.hidden[kind])), framework="pt") as handle:
                handle.get_tensor(stack)


def _checked_pass(directory: Path, stack: str, kinds: list[str], *, drop_markers: bool) -> None:
    if drop_markers:
        (directory / VERIFIED_MARKER).unlink(missing_ok=True)
    store = TraceStore.open(directory)
    for index in range(len(store.manifest.shards)):
        store.read_shard(index, stack)
        for kind in kinds:
            store.hidden_states(index, kind, stack)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _summary(seconds: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "max_s": round(max(seconds), 4),
        "runs_s": [round(s, 4) for s in seconds],
    }


def git_commit() -> str:
    """The commit of this checkout, for the report (``unknown`` outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def benchmark_verification(traces: str | Path, *, repeats: int = 5) -> dict:
    """Seconds per pass over the whole store, per variant, with the spread of ``repeats``."""
    directory = Path(traces)
    store = TraceStore.open(directory)
    stack = store.default_stack()
    kinds = list(store.manifest.collection.hidden)
    sizes = {"routing": 0, **dict.fromkeys(kinds, 0)}
    for shard in store.manifest.shards:
        sizes["routing"] += shard.routing.bytes
        for kind in kinds:
            sizes[kind] += shard.hidden[kind].bytes
    variants = {
        "unchecked": lambda: _unchecked_pass(store, stack, kinds),
        "checked": lambda: _checked_pass(directory, stack, kinds, drop_markers=False),
        "first_read": lambda: _checked_pass(directory, stack, kinds, drop_markers=True),
    }
    _checked_pass(directory, stack, kinds, drop_markers=True)  # warm the page cache, leave markers
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_timed(fn))
    _checked_pass(directory, stack, kinds, drop_markers=False)  # leave the markers current
    total_bytes = sum(sizes.values())
    hash_s = [_timed(lambda: [sha256_file(p) for p in directory.glob("shard-*")]) for _ in range(repeats)]
    unchecked = statistics.median(times["unchecked"])
    return {
        "benchmark": "verification",
        "traces": str(directory),
        "shards": len(store.manifest.shards),
        "tokens": store.manifest.num_tokens,
        "bytes": sizes,
        "repeats": repeats,
        "passes": {name: _summary(seconds) for name, seconds in times.items()},
        "checked_overhead_fraction": round(statistics.median(times["checked"]) / unchecked - 1, 4),
        "first_read_overhead_fraction": round(statistics.median(times["first_read"]) / unchecked - 1, 4),
        "full_hash": {**_summary(hash_s), "mb_per_s": round(total_bytes / 1e6 / statistics.median(hash_s), 1)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "specmoe_version": specmoe.__version__,
        "commit": git_commit(),
    }
