"""Constructor arguments of a predictor, checked before they reach it.

They come from users (``--param``, run configs) and from saved ``predictor.json`` files, so
each is checked against the constructor's annotation (strictly: ``"3"`` is not an int) and
against the ranges every predictor shares: numbers finite and non-negative, and the sizes
and counts below at least 1. A failure is one line naming the parameter and the source.
"""

from __future__ import annotations

import inspect
import json
import math
import typing

from pydantic import TypeAdapter, ValidationError

from specmoe.errors import InputError

AT_LEAST_ONE = frozenset(
    {
        "horizons",
        "epochs",
        "batch_size",
        "max_steps_per_epoch",
        "context_layers",
        "d_model",
        "heads",
        "ff",
        "depth",
        "width",
        "em_iterations",
    }
)
"""Parameters that count or size something and are meaningless below 1 (None stays allowed
where the annotation allows it). Not ``memory_slots``: 0 switches the interlayer's pattern
memory off (its ablation)."""


def constructor_annotations(cls: type) -> dict[str, object]:
    """Annotation of every keyword argument along the class hierarchy (a subclass may pass
    some on to its base as ``**kwargs``), as :meth:`ExpertPredictor.get_params` sees them."""
    found: dict[str, object] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            hints = typing.get_type_hints(klass.__init__)
        except NameError:  # an annotation that does not resolve here: checked by the constructor alone
            hints = {}
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name != "self" and param.kind is not inspect.Parameter.VAR_KEYWORD:
                found.setdefault(name, hints.get(name, typing.Any))
    return found


def _type_name(annotation) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _numbers(value):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)


def check_params(cls: type, params: object, source: str) -> dict:
    """``params`` validated for ``cls``'s constructor (tuples as tuples); an
    :class:`InputError` naming ``source`` and the parameter otherwise."""
    name = getattr(cls, "name", cls.__name__)
    if not isinstance(params, dict):
        raise InputError(f"{source}: parameters of {name} must be a mapping, got {type(params).__name__}")
    annotations = constructor_annotations(cls)
    unknown = sorted(set(params) - set(annotations))
    if unknown:
        raise InputError(f"{source}: {name} has no parameter {unknown}; it takes {sorted(annotations)}")
    checked = {}
    for key, value in params.items():
        try:
            checked[key] = TypeAdapter(annotations[key]).validate_json(json.dumps(value), strict=True)
        except (ValidationError, TypeError, ValueError):
            raise InputError(f"{source}: parameter {key}={value!r} must be {_type_name(annotations[key])}") from None
        lowest = 1 if key in AT_LEAST_ONE else 0
        for number in _numbers(checked[key]):
            if not math.isfinite(number) or number < lowest:
                raise InputError(f"{source}: parameter {key}={value!r} must be a finite number >= {lowest}")
    return checked
