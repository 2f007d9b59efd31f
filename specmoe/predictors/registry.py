"""Predictors and presets by name, for the CLI and the benchmark."""

from __future__ import annotations

from specmoe.errors import InputError
from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.combination import InterpolatedPredictor, StackingPredictor
from specmoe.predictors.counting import NGramPredictor, PopularityPredictor, TokenTablePredictor, TransitionPredictor
from specmoe.predictors.history import ActivationHistoryPredictor
from specmoe.predictors.params import check_params

PREDICTORS: dict[str, type[ExpertPredictor]] = {
    cls.name: cls
    for cls in (
        PopularityPredictor,
        TransitionPredictor,
        NGramPredictor,
        TokenTablePredictor,
        InterpolatedPredictor,
        StackingPredictor,
        ActivationHistoryPredictor,
    )
}
PRESETS: dict[str, dict[str, dict]] = {}
"""``PRESETS[predictor][preset] -> constructor keyword arguments``."""


def register(cls: type[ExpertPredictor], presets: dict[str, dict] | None = None) -> type[ExpertPredictor]:
    PREDICTORS[cls.name] = cls
    if presets:
        PRESETS[cls.name] = presets
    return cls


def predictor_class(name: str) -> type[ExpertPredictor]:
    _import_optional_families()
    try:
        return PREDICTORS[name]
    except KeyError:
        raise InputError(f"unknown predictor {name!r}; available: {', '.join(sorted(PREDICTORS))}") from None


def predictor_label(name: str, preset: str | None = None) -> str:
    """How a predictor and its preset are written everywhere (options, configs, reports,
    run directories): ``name`` or ``name:preset``."""
    return f"{name}:{preset}" if preset else name


def parse_label(label: str) -> tuple[str, str | None]:
    """``name[:preset]`` -> (name, preset or None)."""
    name, _, preset = label.partition(":")
    return name, preset or None


def make_predictor(name: str, preset: str | None = None, **overrides) -> ExpertPredictor:
    cls = predictor_class(name)
    params = {}
    if preset is not None:
        presets = PRESETS.get(name, {})
        if preset not in presets:
            raise InputError(f"predictor {name!r} has no preset {preset!r}; presets: {sorted(presets) or 'none'}")
        params.update(presets[preset])
    params.update(overrides)
    return cls(**check_params(cls, params, f"bad parameters for predictor {name!r}"))


def _import_optional_families() -> None:
    """Neural and cross-token predictors register themselves on import (they pull in more of
    torch, and the model loader for their lens)."""
    import specmoe.predictors.neural  # noqa: F401
    from specmoe.predictors.cross_token import NextTokenTablePredictor

    register(NextTokenTablePredictor)
