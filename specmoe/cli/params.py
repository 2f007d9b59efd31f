"""Option parsing shared by the commands: ``--param key=value`` and comma-separated lists."""

from __future__ import annotations

import json

from specmoe.errors import InputError


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
