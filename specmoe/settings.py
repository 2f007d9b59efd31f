"""Settings objects as the one source of command-line options and config sections.

Settings are pydantic models (frozen, unknown keys refused) with a description per field.
A field ``cache_fractions`` is the option ``--cache-fractions``; the fields of a nested
settings object are options too, under the nested object's ``flag_prefix`` (for example
``--next-token-layer`` for ``next_token.layer``). The CLI builds its options from them
(:func:`specmoe.cli.params.option`), ``specmoe run`` config sections embed or extend them,
and a command line that reproduces a run is generated from them (:func:`command_flags`)
rather than written by hand.
"""

from __future__ import annotations

import shlex
from typing import ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from specmoe.errors import InputError

S = TypeVar("S", bound=BaseModel)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    flag_prefix: ClassVar[str] = ""
    """Prepended to the option names of this object's fields when it is nested in another."""


def flag_name(field: str, prefix: str = "") -> str:
    return "--" + prefix + field.replace("_", "-")


def validated(model: type[S], values: dict, *, where: str = "") -> S:
    """``model(**values)``, with an invalid value reported as one line naming its option."""
    prefix = model.flag_prefix if issubclass(model, Settings) else ""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
            name = _nested_flag(model, loc, prefix) if loc else where or model.__name__
            problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
        raise InputError("; ".join(problems)) from None


def command_flags(settings: BaseModel, defaults: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """The options that reproduce ``settings`` against the defaults of ``defaults`` (the
    command's own settings class; default: the class of ``settings``): only values that
    differ are written, lists comma-separated."""
    defaults = defaults or type(settings)
    flags = []
    for name, field in defaults.model_fields.items():
        if name not in type(settings).model_fields:
            continue
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            flags += command_flags(value, type(value), prefix + getattr(type(value), "flag_prefix", ""))
            continue
        default = field.get_default(call_default_factory=True)
        if value == default:
            continue
        flag = flag_name(name, prefix)
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(str(v) for v in value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def flags(**values) -> list[str]:
    """Options from keyword values: ``seq_len=128`` is ``--seq-len 128``, ``True`` a bare flag,
    a list one option per item; ``False`` and ``None`` are left out."""
    out = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag_name(name))
        elif isinstance(value, (list, tuple)):
            out += [word for item in value for word in (flag_name(name), str(item))]
        else:
            out += [flag_name(name), str(value)]
    return out


def command_line(words: list[str], *settings: tuple[BaseModel, type[BaseModel] | None]) -> str:
    """``specmoe WORDS... OPTIONS``, quoted for a shell."""
    flags = [flag for item, defaults in settings for flag in command_flags(item, defaults)]
    return "specmoe " + " ".join(shlex.quote(str(word)) for word in [*words, *flags])


def _nested_flag(model: type[BaseModel], loc: list[str], prefix: str) -> str:
    for depth, part in enumerate(loc):
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        nested = next((a for a in getattr(annotation, "__args__", (annotation,)) if _is_settings(a)), None)
        if nested is None or depth == len(loc) - 1:
            return flag_name(part, prefix)
        prefix += getattr(nested, "flag_prefix", "")
        model = nested
    return flag_name(loc[-1], prefix)


def _is_settings(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)
