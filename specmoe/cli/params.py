"""Option parsing shared by the commands: ``--param key=value``, comma-separated lists, and
options made from settings fields."""

from __future__ import annotations

import json

import typer
from pydantic import BaseModel

from specmoe.errors import InputError
from specmoe.settings import flag_name


def parse_params(pairs: list[str] | None) -> dict:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def parse_list(text: str, kind: type, option: str, *, length: int | None = None) -> tuple:
    """``"0.1,0.25"`` -> ``(0.1, 0.25)``; a clear error naming ``option`` for anything else."""
    try:
        values = tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"{option} expects comma-separated {kind.__name__}s, got {text!r}") from None
    if length is not None and len(values) != length:
        raise InputError(f"{option} expects {length} comma-separated values, got {text!r}")
    return values


def option(model: type[BaseModel], field: str, *, help: str | None = None, **kwargs):
    """The typer option of settings field ``field`` (see :mod:`specmoe.settings`): its name,
    and the field's description as help."""
    description = help or model.model_fields[field].description
    return typer.Option(flag_name(field, getattr(model, "flag_prefix", "")), help=description, **kwargs)


def default(model: type[BaseModel], field: str):
    """The field's default as the option takes it (lists comma-separated)."""
    value = model.model_fields[field].get_default(call_default_factory=True)
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def values_for(model: type[BaseModel], options: dict) -> dict:
    """The values of ``model``'s fields among a command's ``options`` (its ``locals()``), by
    name: options and settings fields share names (see :mod:`specmoe.settings`)."""
    prefix = getattr(model, "flag_prefix", "").replace("-", "_")
    return {field: options[prefix + field] for field in model.model_fields if prefix + field in options}
