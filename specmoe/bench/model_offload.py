"""``specmoe bench offload --model CKPT``: a real checkpoint decoding under one memory budget,
by specmoe's policies and by what a user would otherwise use, side by side.

Every run is a process of its own, placed (where the machine allows: a writable cgroup v1
memory controller) in a cgroup whose limit, counting the page cache, is the same for every
variant: the memory specmoe's offloaded runtime needs for the fast tier asked for. A variant
that does not fit is killed by the kernel, and its row says so. Variants:

- ``resident``: ``from_pretrained``, the whole model in memory, with no limit (the speed to
  aim for, on a machine where it fits);
- ``accelerate``: Hugging Face accelerate's disk offload (``device_map="auto"``,
  ``max_memory``, ``offload_folder``), what ``from_pretrained`` offers;
- ``mmap``: the experts memory-mapped, read in place through the operating system's page
  cache with no cache of specmoe's own (what llama.cpp does);
- specmoe's policies (:data:`~specmoe.offload.policy.POLICIES`): the offloaded runtime,
  experts read from the expert store with the page cache bypassed.

Each run decodes ``warmup + tokens`` tokens greedily from one prompt; tokens/s is timed over
the last ``tokens``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from specmoe.bench.settings import ModelBenchSettings
from specmoe.errors import InputError
from specmoe.offload.policy import POLICIES

BASELINES = ("resident", "accelerate", "mmap")
CGROUP = Path("/sys/fs/cgroup/memory")
FIXED_OVERHEAD = 96 << 20
"""What the offloaded runtime holds beyond the base process, the non-expert weights, the fast
tier and two experts in flight (see README, "Guarantees" and tests/offload/live/test_memory.py)."""


def run_variant(spec: dict) -> dict:
    """One run, in this process: load, decode, report (the worker's whole job)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from specmoe.memory import peak_rss_bytes, reset_peak_rss

    began = time.perf_counter()
    model, tokenizer, runtime, cleanup = _load(spec)
    load_s = time.perf_counter() - began
    ids = tokenizer(spec["prompt"], return_tensors="pt").input_ids
    stamps = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            if len(stamps) == spec["warmup"] and runtime is not None:
                runtime.session.restart_counts()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    reset_peak_rss()
    try:
        with torch.no_grad():
            model.generate(
                ids,
                max_new_tokens=spec["warmup"] + spec["tokens"],
                min_new_tokens=spec["warmup"] + spec["tokens"],
                do_sample=False,
                stopping_criteria=StoppingCriteriaList([Clock()]),
            )
    finally:
        cleanup()
    seconds = stamps[-1] - stamps[spec["warmup"] - 1]
    row = {
        "load_s": round(load_s, 3),
        "tokens": len(stamps) - spec["warmup"],
        "seconds": round(seconds, 4),
        "tokens_per_s": (len(stamps) - spec["warmup"]) / seconds,
        "peak_rss_bytes_decoding": peak_rss_bytes(),
    }
    if runtime is not None:
        stats = runtime.results()
        row |= {k: stats[k] for k in ("hit_rate", "stall_s", "bytes_read", "demand_reads", "prefetch_reads")}
        row |= {
            "stall_ms_per_token": 1e3 * stats["stall_s"] / row["tokens"],
            "peak_fast_tier_bytes": stats["peak_bytes"],
        }
    return row


def _load(spec: dict):
    """(model, tokenizer, runtime or None, cleanup) of the variant."""

    variant = spec["variant"]
    if variant in ("resident", "accelerate"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        placement = {}
        if variant == "accelerate":
            placement = {
                "device_map": "auto",
                "max_memory": {"cpu": spec["weights_budget_bytes"]},
                "offload_folder": spec["offload_folder"],
            }
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto", **placement).eval()
        return model, AutoTokenizer.from_pretrained(spec["model"]), None, lambda: None
    from specmoe.models.offloaded import load_offloaded
    from specmoe.offload.live.expert_files import MappedExperts
    from specmoe.offload.live.expert_store import prepare_store
    from specmoe.offload.live.runtime import OffloadRuntime
    from specmoe.offload.policy import PrefetchSettings
    from specmoe.predictors.base import load_predictor

    offloaded = load_offloaded(spec["model"], progress=False)
    store = prepare_store(offloaded, Path(spec["store"]), progress=False, log=lambda _: None)
    common = {"prefetch": PrefetchSettings.model_validate(spec["prefetch"]), "layouts": offloaded.layouts}
    if variant == "mmap":  # no fast tier of ours: nothing kept between layers, the page cache decides
        experts, policy = MappedExperts(store.directory), "on-demand"
        budget = max(offloaded.expert_nbytes(g) for g in range(len(offloaded.loaded.layers)))
    else:
        experts, policy, budget = store, variant, spec["fast_tier_bytes"]
    if POLICIES[policy].prefetch == "predictor":
        common["predictor"] = load_predictor(spec["predictor_dir"])
    if POLICIES[policy].prefetch == "oracle":  # the routing of this prompt, from a first run
        common["oracle"] = _record_routing(offloaded, spec, store)
    runtime = OffloadRuntime(offloaded.loaded, budget, experts=experts, policy=policy, **common)
    return offloaded.loaded.model, offloaded.loaded.tokenizer, runtime, runtime.close


def _record_routing(offloaded, spec: dict, store) -> list:
    import torch

    from specmoe.offload.live.runtime import OffloadRuntime

    runtime = OffloadRuntime(offloaded.loaded, spec["fast_tier_bytes"], experts=store, layouts=offloaded.layouts)
    ids = offloaded.loaded.tokenizer(spec["prompt"], return_tensors="pt").input_ids
    new = spec["warmup"] + spec["tokens"]
    try:
        with torch.no_grad():
            offloaded.loaded.model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    finally:
        runtime.close()
    return runtime.routing_log


# --- the parent: runs in processes of their own, under one memory limit ---------------------
def benchmark_model_offload(
    model: str, settings: ModelBenchSettings, *, predictor_dir: Path | None = None, store: Path | None = None
) -> dict:
    from specmoe.models.offloaded import load_offloaded
    from specmoe.offload.live.expert_store import default_store, prepare_store
    from specmoe.offload.settings import TierSize

    s = settings
    if any(POLICIES.get(v) and POLICIES[v].prefetch == "predictor" for v in s.variants) and predictor_dir is None:
        raise InputError("--policies prefetch needs a --predictor-dir (a predictor fitted on this model's traces)")
    offloaded = load_offloaded(model)
    store = Path(store) if store is not None else default_store(offloaded)
    prepare_store(offloaded, store)  # once, before any run is timed
    layers = range(len(offloaded.loaded.layers))
    expert = max(offloaded.expert_nbytes(g) for g in layers)
    all_experts = sum(offloaded.expert_nbytes(g) for g in layers) * offloaded.loaded.num_experts
    non_expert = offloaded.non_expert_nbytes()
    del offloaded
    base = _base_rss(model)
    offload_folder = store.with_name(store.name + ".accelerate")
    runs = []
    for fraction in s.cache_fractions:
        tier = TierSize(fraction=fraction).bytes_for(all_experts, expert)
        limit = None
        if s.memory_limit == "auto":
            limit = base + non_expert + tier + 2 * expert + _largest(model) + FIXED_OVERHEAD
        elif s.memory_limit != "none":
            limit = TierSize.parse(s.memory_limit, "--memory-limit").bytes
        for variant in s.variants:
            runs.append(
                {
                    "variant": variant,
                    "model": model,
                    "cache_fraction": fraction,
                    "fast_tier_bytes": tier,
                    # resident is the speed to aim for where the whole model fits: it runs unlimited
                    "memory_limit_bytes": None if variant == "resident" else limit,
                    "weights_budget_bytes": max((limit or 0) - base - FIXED_OVERHEAD, 1 << 20) if limit else None,
                    "store": str(store),
                    "offload_folder": str(offload_folder),
                    "predictor_dir": None if predictor_dir is None else str(predictor_dir),
                    "prefetch": s.prefetch.model_dump(),
                    "prompt": s.prompt,
                    "tokens": s.tokens,
                    "warmup": s.warmup,
                }
            )
    order = [i for _ in range(s.repeats) for i in np.random.default_rng(0).permutation(len(runs))]
    results: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    for i in tqdm(order, desc="model offload", unit="run"):
        results[i].append(_run_in_process(runs[i]))
    rows = [_summarize(runs[i], results[i]) for i in range(len(runs))]
    return {
        "benchmark": "offload-model",
        "simulated": False,
        "model": model,
        "weights": "the checkpoint's own",
        "expert_bytes": expert,
        "all_experts_bytes": all_experts,
        "non_expert_bytes": non_expert,
        "base_process_bytes": base,
        "memory_limit": "per run, the cgroup limit below, page cache included"
        if _cgroups()
        else "none (no writable memory cgroup here): peak resident memory is reported instead",
        "settings": s.model_dump(mode="json"),
        "rows": rows,
    }


def _summarize(spec: dict, repeats: list[dict]) -> dict:
    done = [r for r in repeats if "tokens_per_s" in r]
    row = {k: spec[k] for k in ("variant", "cache_fraction", "fast_tier_bytes", "memory_limit_bytes")}
    row["runs"] = len(repeats)
    row["failed"] = [r["error"] for r in repeats if "error" in r]
    if done:
        speeds = sorted(r["tokens_per_s"] for r in done)
        median = sorted(done, key=lambda r: r["tokens_per_s"])[len(done) // 2]
        row |= median | {"tokens_per_s_all_repeats": [round(v, 4) for v in speeds]}
    return row


def _run_in_process(spec: dict) -> dict:
    """The run in a child process, in a memory cgroup of ``memory_limit_bytes`` where one can
    be made; a kill by the limit is reported as such."""
    cgroup = _make_cgroup(spec["memory_limit_bytes"]) if spec["memory_limit_bytes"] else None

    def enter():
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    try:
        child = subprocess.run(
            [sys.executable, "-m", "specmoe.bench.model_offload", json.dumps(spec)],
            capture_output=True,
            text=True,
            preexec_fn=enter,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        peak_cgroup = int((cgroup / "memory.max_usage_in_bytes").read_text()) if cgroup is not None else None
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    if child.returncode != 0:
        killed = child.returncode in (-9, 137)
        reason = "killed: over the memory limit" if killed else child.stderr.strip().splitlines()[-1][-300:]
        return {"error": reason}
    return json.loads(child.stdout.strip().splitlines()[-1]) | {"peak_memory_cgroup_bytes": peak_cgroup}


def _cgroups() -> bool:
    return os.access(CGROUP, os.W_OK)


def _make_cgroup(limit: int) -> Path | None:
    if not _cgroups():
        return None
    group = CGROUP / f"specmoe-bench-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    return group


_BASE = """
import torch, transformers, specmoe.cli
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from specmoe.memory import peak_rss_bytes
with init_empty_weights(include_buffers=False):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({path!r}))
print(peak_rss_bytes())
"""


def _base_rss(model: str) -> int:
    """The process before any weight: interpreter, torch, transformers, the model's code."""
    from specmoe.models.loading import local_checkpoint

    code = _BASE.format(path=str(local_checkpoint(model)))
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
    )


def _largest(model: str) -> int:
    """The largest non-expert tensor: CPU matmul kernels may copy it once, for a moment."""
    from specmoe.models.checkpoint import SafetensorsCheckpoint
    from specmoe.models.loading import local_checkpoint

    entries = SafetensorsCheckpoint(local_checkpoint(model)).entries
    return max(e.nbytes for k, e in entries.items() if ".experts." not in k)


if __name__ == "__main__":
    try:
        print(json.dumps(run_variant(json.loads(sys.argv[1]))))
    except MemoryError:
        sys.exit(137)


def model_table(report: dict) -> str:
    """The rows as a plain-text table: median tokens/s [range over repeats], peak memory."""
    lines = [f"{'tier':>5} {'variant':<14} {'tok/s [range]':>24} {'peak MiB':>9} {'limit MiB':>9} {'stall ms/tok':>12}"]
    for r in report["rows"]:
        limit = "-" if r["memory_limit_bytes"] is None else f"{r['memory_limit_bytes'] / 2**20:.0f}"
        if "tokens_per_s" not in r:
            lines.append(f"{r['cache_fraction']:>5.2f} {r['variant']:<14} {'; '.join(r['failed'])[:60]}")
            continue
        speeds = r["tokens_per_s_all_repeats"]
        speed = f"{r['tokens_per_s']:.3f} [{min(speeds):.3f}-{max(speeds):.3f}]"
        peak = r.get("peak_memory_cgroup_bytes") or r["peak_rss_bytes_decoding"]
        stall = f"{r['stall_ms_per_token']:.0f}" if "stall_ms_per_token" in r else "-"
        lines.append(
            f"{r['cache_fraction']:>5.2f} {r['variant']:<14} {speed:>24} {peak / 2**20:>9.0f} {limit:>9} {stall:>12}"
        )
    return "\n".join(lines)


def compare_expert_reads(model: str, *, store: Path | None = None, experts: int = 64, repeats: int = 3) -> dict:
    """Milliseconds per expert read, from the aligned expert store (O_DIRECT) and straight
    from the checkpoint's safetensors (buffered, the pages dropped), the same experts in the
    same random order, the two sources interleaved: which source ``serve`` should read from."""
    from specmoe.models.offloaded import load_offloaded
    from specmoe.offload.live.expert_store import CheckpointExperts, prepare_store

    offloaded = load_offloaded(model, progress=False)
    sources = {"store": prepare_store(offloaded, store, progress=False, log=lambda _: None)}
    if offloaded.expert_ranges(0, 0) is not None:
        sources["checkpoint"] = CheckpointExperts(offloaded)
    layers, count = len(offloaded.loaded.layers), offloaded.loaded.num_experts
    rng = np.random.default_rng(0)
    keys = [(int(k) // count, int(k) % count) for k in rng.choice(layers * count, experts, replace=False)]
    times: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(repeats):
        for name in rng.permutation(list(sources)):
            tier = sources[name]
            tier.reserve_buffers(2)
            began = time.perf_counter()
            for key in keys:
                tier.read(*key)
            times[name].append(1e3 * (time.perf_counter() - began) / len(keys))
    expert = offloaded.expert_nbytes(0)
    return {
        "benchmark": "expert-reads",
        "model": model,
        "expert_bytes": expert,
        "experts_read": len(keys),
        "sources": {
            name: {
                "ms_per_expert_all_repeats": [round(t, 3) for t in values],
                "ms_per_expert": round(float(np.median(values)), 3),
                "gb_per_s": round(expert / 1e6 / float(np.median(values)), 3),
                "reads_per_expert": 1 if name == "store" else sum(len(p) for p in sources[name].ranges[0, 0]),
            }
            for name, values in times.items()
        },
    }
