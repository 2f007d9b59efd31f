"""The configuration of ``specmoe run``: one YAML file per model, validated on load.

Every field is read by a stage of :mod:`specmoe.run.pipeline`; an unknown or misspelt key is
an error that names it. The defaults are the built-in default run (``configs/builtin.yaml``
holds the same values), sized to finish in about ten minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from specmoe.bench.settings import OffloadBenchSettings
from specmoe.errors import InputError
from specmoe.offload.simulated.settings import HardwareSettings, SweepSettings
from specmoe.storage.paths import UnsafePathError, check_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    id: str = "switch-128e"
    """Hub id, local checkpoint directory, or built-in model name."""
    model_type: str | None = None
    """If set, the checkpoint's ``config.model_type`` must equal it (guards against a wrong path)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    fast_tier: str | None = None
    """For a model larger than memory: collect through the offloaded runtime with this much
    memory for routed experts (``25%``, ``4GiB``); its expert store is written on first use.
    None: the model is loaded whole."""

    @field_validator("fast_tier")
    @classmethod
    def _size(cls, value):
        from specmoe.offload.settings import TierSize

        if value is not None:
            try:
                TierSize.parse(value, "fast_tier")
            except InputError as exc:
                raise ValueError(str(exc).removeprefix("fast_tier: ")) from None
        return value


class CollectSection(_Section):
    texts: list[str] = Field(default_factory=lambda: ["builtin"], min_length=1)
    """Text sources, as for ``specmoe collect --text``."""
    max_tokens: int | None = Field(default=300_000, gt=0)
    """Stop after about this many tokens (None: all of the text)."""
    seq_len: int = Field(default=128, gt=1)
    batch_size: int = Field(default=32, gt=0)
    save_router_inputs: bool = False
    save_residuals: bool = True
    """Residual streams, for the training-free lookahead and hidden-state predictors."""
    generate: int = Field(default=0, ge=0)
    """Decode mode (decoder-only models): as ``specmoe collect --generate``."""


class PredictorSpec(_Section):
    name: str
    """A predictor of ``specmoe predictors list``."""
    preset: str | None = None
    params: dict = Field(default_factory=dict)
    """Constructor keyword arguments (CPU budgets: epochs, max_steps_per_epoch, ...)."""

    @property
    def label(self) -> str:
        from specmoe.predictors.registry import predictor_label

        return predictor_label(self.name, self.preset)

    @model_validator(mode="after")
    def _label_is_a_safe_name(self):
        # The label names directories of the run (predictors/<label>/, metrics/<label>.json).
        try:
            check_name(self.name, "predictor name")
            if self.preset is not None:
                check_name(self.preset, f"preset of predictor {self.name}")
            check_name(self.label, "predictor label")
        except UnsafePathError as exc:
            raise ValueError(str(exc)) from None
        return self


class PredictorsSection(_Section):
    horizons: int = Field(default=3, ge=1)
    split_seed: int = 0
    bootstrap: int = Field(default=1000, ge=0)
    """Bootstrap resamples over documents for the 95% intervals."""
    models: list[PredictorSpec] = Field(
        default_factory=lambda: [
            PredictorSpec(name="popularity"),
            PredictorSpec(name="transition"),
            PredictorSpec(name="ngram"),
            PredictorSpec(name="token"),
            PredictorSpec(name="combo"),
            PredictorSpec(name="lookahead"),
            PredictorSpec(name="lookahead-corrected", params={"epochs": 2, "max_steps_per_epoch": 60}),
            PredictorSpec(
                name="interlayer",
                preset="small",
                params={"epochs": 2, "max_steps_per_epoch": 60, "batch_size": 128},
            ),
        ],
        min_length=1,
    )

    @model_validator(mode="after")
    def _unique_labels(self):
        labels = [m.label for m in self.models]
        duplicated = sorted({label for label in labels if labels.count(label) > 1})
        if duplicated:
            raise ValueError(f"predictors listed twice: {duplicated}")
        return self


class SimulateSection(SweepSettings, HardwareSettings):
    """SIMULATION: :class:`SweepSettings` and :class:`HardwareSettings` (the options of
    ``specmoe simulate``), with defaults sized for the run."""

    expert_bytes: int | None = Field(default=None, gt=0)
    """Bytes per expert (None: the offload benchmark's experts, else the model's own in ``dtype``)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    batch_sizes: tuple[int, ...] = Field((1, 8), min_length=1, description="Decode batch sizes.")
    max_windows: int | None = Field(32, gt=0, description="Sequences replayed from the split.")
    prefetch_predictors: list[str] | None = Field(default_factory=lambda: ["token", "ngram", "lookahead"])
    """Labels of ``predictors.models`` that drive prefetch (None: all of them)."""


class OffloadSection(OffloadBenchSettings):
    """MEASURED: :class:`OffloadBenchSettings` (the options of ``specmoe bench offload``),
    with defaults sized for the run."""

    enabled: bool = True
    expert_shape: tuple[int, int] | None = Field(
        (768, 2048), description="hidden,ffn of the experts read from disk (random weights); None: the model's own."
    )
    repeats: int = Field(3, ge=1, description="Runs per configuration, in shuffled order; the median is kept.")
    prefetch_predictors: list[str] = Field(default_factory=lambda: ["token", "ngram"])
    """Labels of ``predictors.models`` that drive prefetch."""


class RunConfig(_Section):
    model: ModelSection = ModelSection()
    collect: CollectSection = CollectSection()
    predictors: PredictorsSection = PredictorsSection()
    simulate: SimulateSection = SimulateSection()
    offload: OffloadSection = OffloadSection()

    @model_validator(mode="after")
    def _known_prefetchers(self):
        labels = {m.label for m in self.predictors.models}
        for section, wanted in (
            ("simulate", self.simulate.prefetch_predictors),
            ("offload", self.offload.prefetch_predictors),
        ):
            unknown = sorted(set(wanted or ()) - labels)
            if unknown:
                raise ValueError(
                    f"{section}.prefetch_predictors names {unknown}, not in predictors.models {sorted(labels)}"
                )
        return self


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The config in ``path`` (None: the built-in default) with ``section.key=value`` overrides
    (values in YAML syntax) applied."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return make_run_config(data, overrides, source=path)


def make_run_config(data: dict, overrides: list[str] | None = None, *, source: Path | None = None) -> RunConfig:
    """Validate ``data`` (sections as in the YAML files) after applying ``overrides``."""
    data = json.loads(json.dumps(data))  # a deep copy: overrides never touch the caller's dict
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            ": ".join(filter(None, (".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))))
            for e in exc.errors()
        )
        raise InputError(f"invalid run config{f' {source}' if source else ''}: {problems}") from None
