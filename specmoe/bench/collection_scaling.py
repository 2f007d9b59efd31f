"""How collection scales with processes (``specmoe bench collect --processes 1,2``).

For each process count P the benchmark launches a real ``torchrun --nproc-per-node P`` job
(this module's ``__main__``, one worker per rank). The ranks split the windows as ``collect``
does (shard i to rank i % P) and, between barriers, time: the plain forward pass over their
windows, the hooked one that ``collect`` makes, alternately, then a real sharded ``collect``
into a temporary store. A phase lasts until the slowest rank is done, so tokens/s is the
job's. Every launch gets the same CPUs: P processes of cpus // P threads each (on GPUs, one
device per rank). Launches of the different P alternate, round after round, so drift of the
machine hits all of them; the report gives every round and the spread.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import specmoe
from specmoe.bench.collection import forward_passes, machine_info, timed
from specmoe.errors import InputError
from specmoe.storage.scratch import scratch_dir


def benchmark_scaling(
    model: str,
    *,
    processes: tuple[int, ...],
    rounds: int,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    windows_per_shard: int,
    repeats: int,
    text: str = "builtin",
) -> dict:
    if not processes or min(processes) < 1:
        raise InputError(f"--processes must be positive counts, got {processes}")
    if rounds < 1 or repeats < 1:
        raise InputError("--rounds and --repeats must be at least 1")
    settings = {
        "model": model,
        "text": text,
        "max_tokens": max_tokens,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "windows_per_shard": windows_per_shard,
        "repeats": repeats,
    }
    cpus = os.cpu_count() or 1
    runs: dict[int, list[dict]] = {count: [] for count in processes}
    for _ in range(rounds):
        for count in processes:
            runs[count].append(_launch(count, max(1, cpus // count), settings))
    rows = [_summary(count, runs[count]) for count in processes]
    base = rows[0]["end_to_end_tokens_per_s"]["median"]
    for row in rows:
        row["end_to_end_speedup"] = round(row["end_to_end_tokens_per_s"]["median"] / base, 3)
    return {
        "benchmark": "collect-scaling",
        **settings,
        "processes": list(processes),
        "rounds": rounds,
        "rows": rows,
        "machine": machine_info(),
        "specmoe_version": specmoe.__version__,
    }


def _launch(count: int, threads: int, settings: dict) -> dict:
    with scratch_dir("bench-collect-scaling") as tmp:
        result = tmp / "result.json"
        job = {**settings, "out": str(tmp / "traces"), "result": str(result)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}"]
        command += ["-m", "specmoe.bench.collection_scaling", json.dumps(job)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {count} processes failed:\n{proc.stderr[-3000:]}")
        return {**json.loads(result.read_text()), "threads_per_process": threads}


def _spread(values: list[float], digits: int = 1) -> dict:
    return {name: round(fn(values), digits) for name, fn in (("median", statistics.median), ("min", min), ("max", max))}


def _summary(count: int, runs: list[dict]) -> dict:
    tokens = runs[0]["tokens"]
    plain = [tokens / statistics.median(run["plain_forward_s"]) for run in runs]
    hooked = [tokens / statistics.median(run["hooked_forward_s"]) for run in runs]
    overhead = [
        statistics.median(run["hooked_forward_s"]) / statistics.median(run["plain_forward_s"]) - 1 for run in runs
    ]
    return {
        "processes": count,
        "threads_per_process": runs[0]["threads_per_process"],
        "tokens": tokens,
        "plain_tokens_per_s": _spread(plain),
        "hooked_tokens_per_s": _spread(hooked),
        "hook_overhead_fraction": _spread(overhead, 4),
        "end_to_end_tokens_per_s": _spread([tokens / run["end_to_end_s"] for run in runs]),
        "runs": runs,
    }


def _worker(job: dict) -> None:
    """One rank of a launch: time the plain and hooked passes over its windows, then collect."""
    from specmoe.models.loading import load_model
    from specmoe.models.placement import resolve_device
    from specmoe.torchrun import ControlChannel, init_process_group
    from specmoe.traces.collector import CollectConfig, collect, plan_shards
    from specmoe.traces.distributed import owns

    rank, world = init_process_group()
    control = ControlChannel(world)
    cfg = CollectConfig(
        model=job["model"],
        texts=[job["text"]],
        out=Path(job["out"]),
        max_tokens=job["max_tokens"],
        seq_len=job["seq_len"],
        batch_size=job["batch_size"],
        windows_per_shard=job["windows_per_shard"],
        progress=False,
    )
    loaded = load_model(cfg.model, device=resolve_device(cfg.device))
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    shards = list(plan_shards(cfg, tokenizer))
    mine = [windows for index, windows in shards if owns(index, rank, world)]
    batches = [w[i : i + cfg.batch_size] for w in mine for i in range(0, len(w), cfg.batch_size)]
    plain, hooked = forward_passes(loaded, batches, pad_id)

    def phase(fn) -> float:
        control.barrier()
        return timed(lambda: (fn(), control.barrier()))

    phase(plain)  # warm-up
    plain_s, hooked_s = [], []
    for _ in range(job["repeats"]):
        plain_s.append(phase(plain))
        hooked_s.append(phase(hooked))
    end_to_end_s = phase(lambda: collect(cfg, loaded))
    if rank == 0:
        result = {
            "tokens": sum(len(w.token_ids) for _, windows in shards for w in windows),
            "shards": len(shards),
            "plain_forward_s": plain_s,
            "hooked_forward_s": hooked_s,
            "end_to_end_s": end_to_end_s,
            "device": str(next(loaded.model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
        }
        Path(job["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
