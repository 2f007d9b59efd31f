"""``specmoe run``: collect → train → evaluate → simulate → offload benchmark → report, in one
run directory, resumable.

A stage is done when ``stages.json`` records it with the fingerprint of the config sections
it depends on. A rerun skips done stages, redoes a stage whose sections changed (and so every
stage after it that reads them), and resumes an interrupted collection or training from what
it left on disk. The report is rendered at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer
import yaml

from specmoe.errors import CorruptDataError, InputError
from specmoe.run import stages
from specmoe.run.config import RunConfig
from specmoe.storage import atomic
from specmoe.storage.locks import DirectoryLock
from specmoe.storage.paths import is_project_metadata, join_inside, remove_inside


@dataclass
class Stage:
    name: str
    depends_on: dict
    """The config values that decide the stage's output; its fingerprint is their hash."""
    action: Callable[[RunConfig, Path], dict]
    output: str
    """Path (in the run directory) the stage writes; removed when its config has changed."""

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.depends_on, sort_keys=True).encode()).hexdigest()[:16]


def plan(config: RunConfig) -> list[Stage]:
    def values(*sections: str, **extra) -> dict:
        return {**{name: getattr(config, name).model_dump(mode="json") for name in sections}, **extra}

    p = config.predictors
    steps = [
        Stage("collect", values("model", "collect"), stages.collect, "traces"),
        Stage("describe", values("model", "collect"), stages.describe, "traces.json"),
    ]
    for spec in p.models:  # a predictor's stages depend on its own spec only: editing one retrains one
        trained = values(
            "model", "collect", spec=spec.model_dump(mode="json"), horizons=p.horizons, split_seed=p.split_seed
        )
        steps.append(Stage(f"train:{spec.label}", trained, stages.trainer(spec), f"predictors/{spec.label}"))
        scored = {**trained, "bootstrap": p.bootstrap}
        steps.append(Stage(f"evaluate:{spec.label}", scored, stages.evaluator(spec), f"metrics/{spec.label}.json"))
    steps.append(Stage("simulate", values("model", "collect", "predictors", "simulate"), stages.simulate, "simulation"))
    if config.offload.enabled:
        steps.append(Stage("offload", values("model", "collect", "predictors", "offload"), stages.offload, "offload"))
    return steps


class RunLedger:
    """``stages.json``: which stages finished, with which fingerprint, in how long."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.records: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text())
            except (ValueError, UnicodeDecodeError):
                self.records = None
            if not isinstance(self.records, dict) or not all(isinstance(r, dict) for r in self.records.values()):
                raise CorruptDataError(
                    f"{self.path}: not a readable stage record (it is written atomically, so something else "
                    "changed it); write {} into it and rerun to redo every stage"
                )

    def is_done(self, stage: Stage, fingerprint: str) -> bool:
        record = self.records.get(stage.name, {})
        return record.get("fingerprint") == fingerprint and record.get("status") == "done"

    def is_stale(self, stage: Stage, fingerprint: str) -> bool:
        """Started or finished under another config: its output cannot be resumed or reused."""
        return stage.name in self.records and self.records[stage.name].get("fingerprint") != fingerprint

    def start(self, stage: Stage, fingerprint: str) -> None:
        self.records[stage.name] = {"fingerprint": fingerprint, "status": "running"}
        self._write()

    def finish(self, stage: Stage, fingerprint: str, seconds: float, info: dict) -> None:
        self.records[stage.name] = {"fingerprint": fingerprint, "status": "done", "seconds": round(seconds, 2), **info}
        self._write()

    def _write(self) -> None:
        atomic.write_json(self.path, self.records)


def run_pipeline(config: RunConfig, out: Path, *, command: str = "") -> dict:
    """Run every stage not yet done for ``config`` in ``out``; returns ``summary.json``'s content.
    ``out`` is locked meanwhile: a second run into it is refused."""
    with DirectoryLock(out, "specmoe run"):
        return _run_locked(config, Path(out), command)


def _run_locked(config: RunConfig, out: Path, command: str) -> dict:
    from specmoe.report.build import write_report

    atomic.remove_temporaries(out)
    if any(not is_project_metadata(p.name) for p in out.iterdir()) and not (out / "stages.json").exists():
        raise InputError(
            f"{out} already holds files that no `specmoe run` wrote (no stages.json); choose another --out"
        )
    atomic.write_text(out / "config.yaml", yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    ledger = RunLedger(out)
    steps = plan(config)
    for name in set(ledger.records) - {stage.name for stage in steps}:  # e.g. a predictor no longer configured
        del ledger.records[name]
    started = time.perf_counter()
    for index, stage in enumerate(steps, 1):
        fingerprint = stage.fingerprint
        header = f"[{index}/{len(steps)}] {stage.name}"
        if ledger.is_done(stage, fingerprint):
            typer.echo(f"{header}: done earlier ({ledger.records[stage.name]['seconds']:.0f} s), reused", err=True)
            continue
        output = join_inside(out, stage.output, f"output of stage {stage.name}")
        if ledger.is_stale(stage, fingerprint) and os.path.lexists(output):
            # Only what a recorded stage wrote, checked to lie inside the run directory.
            typer.echo(f"{header}: config changed since its last run; redoing it", err=True)
            remove_inside(out, output)
        typer.echo(f"{header} ...", err=True)
        ledger.start(stage, fingerprint)
        t0 = time.perf_counter()
        info = stage.action(config, out) or {}
        ledger.finish(stage, fingerprint, time.perf_counter() - t0, info)
        typer.echo(f"{header}: {time.perf_counter() - t0:.0f} s", err=True)
    write_report(out, command=command, seconds=time.perf_counter() - started)
    return json.loads((out / "summary.json").read_text())
