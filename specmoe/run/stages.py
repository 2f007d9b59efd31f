"""The stages of ``specmoe run``. Each reads the run directory, writes its own output there,
and returns a small dict recorded in ``stages.json``.

Run directory::

    config.yaml  stages.json  summary.json  report.html  summary.md
    traces/                      routing traces (Parquet + safetensors)
    traces.json                  trace summary and per-layer usage
    predictors/<label>/          fitted predictors (safetensors + JSON), train_info.json
    metrics/<label>.json         test-split metrics with intervals, calibration, cost
    simulation/                  SIMULATION: simulation.json, speed_vs_memory.png
    offload/offload.json         measured replay: experts of a real shape read from disk
"""

from __future__ import annotations

import json
from pathlib import Path

from specmoe.errors import InputError
from specmoe.run.config import PredictorSpec, RunConfig
from specmoe.settings import command_line, flags
from specmoe.storage import atomic

SKIPPED = "skipped.json"


def collect(config: RunConfig, out: Path) -> dict:
    from specmoe.traces.collector import CollectConfig
    from specmoe.traces.collector import collect as collect_traces

    c = config.collect
    if config.model.model_type is not None:
        from specmoe.models.loading import load_config

        found = load_config(config.model.id, trust_remote_code=config.model.trust_remote_code).model_type
        if found != config.model.model_type:
            raise InputError(
                f"model.id {config.model.id} is a {found!r} checkpoint; this config is for {config.model.model_type!r}"
            )
    runtime = None
    if config.model.fast_tier is not None:  # a model larger than memory: its experts stay on disk
        from specmoe.offload.live.runtime import OffloadRuntime
        from specmoe.offload.settings import TierSize

        runtime = OffloadRuntime.from_checkpoint(
            config.model.id,
            TierSize.parse(config.model.fast_tier, "model.fast_tier"),
            dtype=config.model.dtype,
            trust_remote_code=config.model.trust_remote_code,
            policy="lru",
        )
    try:
        store = collect_traces(
            CollectConfig(
                model=config.model.id,
                texts=c.texts,
                out=out / "traces",
                max_tokens=c.max_tokens,
                seq_len=c.seq_len,
                batch_size=c.batch_size,
                save_router_inputs=c.save_router_inputs,
                save_residuals=c.save_residuals,
                generate=c.generate,
                dtype=config.model.dtype,
                trust_remote_code=config.model.trust_remote_code,
            ),
            loaded=None if runtime is None else runtime.loaded,
        )
    finally:
        if runtime is not None:
            runtime.close()
    words = ["collect", *flags(model=config.model.id, text=c.texts, out=out / "traces", seq_len=c.seq_len)]
    words += flags(
        batch_size=c.batch_size, dtype=config.model.dtype, max_tokens=c.max_tokens, generate=c.generate or None
    )
    words += flags(save_router_inputs=c.save_router_inputs, save_residuals=c.save_residuals)
    words += flags(trust_remote_code=config.model.trust_remote_code, fast_tier=config.model.fast_tier)
    return {"tokens": store.manifest.num_tokens, "command": command_line(words)}


def describe(config: RunConfig, out: Path) -> dict:
    from specmoe.traces.stats import store_summary
    from specmoe.traces.store import TraceStore

    summary = store_summary(TraceStore.open(out / "traces"))
    atomic.write_text(out / "traces.json", json.dumps(summary, indent=2))
    return {}


def trainer(spec: PredictorSpec):
    def train(config: RunConfig, out: Path) -> dict:
        from specmoe.predictors.registry import make_predictor
        from specmoe.run.fit import fit_and_save
        from specmoe.traces.store import TraceStore

        target = out / "predictors" / spec.label
        params = {"horizons": config.predictors.horizons, **spec.params}
        probe = make_predictor(spec.name, spec.preset, **params)
        have = TraceStore.open(out / "traces").manifest.collection.hidden
        if probe.needs_hidden and probe.needs_hidden not in have:
            reason = f"needs {probe.needs_hidden} states; collect with collect.save_residuals/save_router_inputs"
            target.mkdir(parents=True, exist_ok=True)
            atomic.write_text(target / SKIPPED, json.dumps({"reason": reason}))
            return {"skipped": reason}
        words = ["train", *flags(predictor=spec.name, traces=out / "traces", out=target, preset=spec.preset)]
        command = command_line(words + flags(param=[f"{k}={json.dumps(v)}" for k, v in params.items()]))
        _, info = fit_and_save(
            spec.name,
            out / "traces",
            target,
            preset=spec.preset,
            split_seed=config.predictors.split_seed,
            resume=True,  # a torch predictor interrupted mid-training continues from its checkpoint
            command=command,
            **params,
        )
        return {"fit_seconds": info["fit_seconds"], "val_recall_at_k": info["val_recall_at_k"], "command": command}

    return train


def evaluator(spec: PredictorSpec):
    def evaluate(config: RunConfig, out: Path) -> dict:
        from specmoe.evaluation.evaluate import evaluate_directory

        source = out / "predictors" / spec.label
        target = out / "metrics" / f"{spec.label}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        if (source / SKIPPED).exists():
            atomic.write_text(target, json.dumps({"label": spec.label, **json.loads((source / SKIPPED).read_text())}))
            return {"skipped": True}
        p = config.predictors
        result = evaluate_directory(source, out / "traces", seed=p.split_seed, bootstrap=p.bootstrap)
        train_info = json.loads((source / "train_info.json").read_text())
        result.update(label=spec.label, fit_seconds=train_info["fit_seconds"])
        words = flags(predictor_dir=source, traces=out / "traces", split_seed=p.split_seed, bootstrap=p.bootstrap)
        result["command"] = command_line(["evaluate", *words, "--json", target])
        atomic.write_text(target, json.dumps(result, indent=2))
        h1 = next(r for r in result["rows"] if r["horizon"] == 1 and r["layer"] == "all")
        return {"test_top1_acc_h1": round(h1["top1_acc"], 4), "command": result["command"]}

    return evaluate


def _usable_predictors(config: RunConfig, out: Path, labels: list[str] | None, *, routing_only: bool) -> dict:
    from specmoe.predictors.base import load_predictor

    chosen = {}
    for spec in config.predictors.models:
        directory = out / "predictors" / spec.label
        if (labels is not None and spec.label not in labels) or (directory / SKIPPED).exists():
            continue
        predictor = load_predictor(directory)
        if routing_only and predictor.needs_hidden:
            continue  # the replay engine decodes from routing alone; it has no hidden states to give
        chosen[spec.label] = (predictor, directory)
    return chosen


def expert_shape(config: RunConfig) -> tuple[int, int]:
    """(hidden, ffn) of the SwiGLU experts the offload benchmark reads: the configured shape,
    or one with the model's own expert byte size."""
    if config.offload.expert_shape is not None:
        return config.offload.expert_shape
    from specmoe.models.loading import expert_nbytes, load_config

    model_config = load_config(config.model.id, trust_remote_code=config.model.trust_remote_code)
    hidden = getattr(model_config, "hidden_size", None) or model_config.d_model
    size = expert_nbytes(config.model.id, "bfloat16", trust_remote_code=config.model.trust_remote_code)
    return hidden, max(1, size // (3 * hidden * 2))


def bytes_per_expert(config: RunConfig) -> int:
    """Simulated expert size: ``simulate.expert_bytes``, else the offload benchmark's experts
    (so simulation and measurement describe the same experts), else the model's own."""
    if config.simulate.expert_bytes:
        return config.simulate.expert_bytes
    if config.offload.expert_shape is not None:
        hidden, ffn = config.offload.expert_shape
        return 3 * hidden * ffn * 2  # gate, up, down in bf16
    from specmoe.models.loading import expert_nbytes

    return expert_nbytes(config.model.id, config.simulate.dtype, trust_remote_code=config.model.trust_remote_code)


def simulate(config: RunConfig, out: Path) -> dict:
    from specmoe.offload.simulated.settings import HardwareSettings, SweepSettings
    from specmoe.offload.simulated.sweep import run_sweep, write_sweep

    s = config.simulate
    chosen = _usable_predictors(config, out, s.prefetch_predictors, routing_only=False)
    predictors = {label: predictor for label, (predictor, _) in chosen.items()}
    size = bytes_per_expert(config)
    seed = config.predictors.split_seed
    report = run_sweep(out / "traces", s.profile(), size, predictors, s, split_seed=seed)
    directories = [directory for _, directory in chosen.values()]
    words = ["simulate", *flags(traces=out / "traces", out=out / "simulation", expert_bytes=size)]
    words += flags(predictor_dir=directories, split_seed=seed)
    report["command"] = command_line(words, (s, SweepSettings), (s, HardwareSettings))
    write_sweep(report, out / "simulation")
    return {"rows": len(report["rows"]), "command": report["command"]}


def offload(config: RunConfig, out: Path) -> dict:
    from specmoe.bench.offload import benchmark_offload
    from specmoe.bench.progress import discard, progress_file_for
    from specmoe.bench.settings import OffloadBenchSettings

    o = config.offload
    predictors = _usable_predictors(config, out, o.prefetch_predictors, routing_only=True)
    directories = [directory for _, directory in predictors.values()]
    settings = OffloadBenchSettings.model_validate(
        {name: getattr(o, name) for name in OffloadBenchSettings.model_fields} | {"expert_shape": expert_shape(config)}
    )
    json_out = out / "offload" / "offload.json"
    report = benchmark_offload(
        out / "traces",
        directories,
        settings,
        split_seed=config.predictors.split_seed,
        experts_dir=out,
        progress_file=progress_file_for(json_out),  # an interrupted stage resumes its runs
    )
    words = ["bench", "offload", *flags(traces=out / "traces", experts_dir=out, predictor_dir=directories)]
    words += ["--json", json_out, *flags(split_seed=config.predictors.split_seed)]
    report["command"] = command_line(words, (settings, None))
    json_out.parent.mkdir(exist_ok=True)
    atomic.write_text(json_out, json.dumps(report, indent=2))
    discard(progress_file_for(json_out))
    return {"rows": len(report["rows"]), "command": report["command"]}
