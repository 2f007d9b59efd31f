"""Settings of offloaded runs that are not the prefetch policy's own
(:class:`~specmoe.offload.policy.PrefetchSettings`): the fast tier's size and next-token
prefetch. The CLI options and the ``specmoe run`` config sections are made from these
classes (names, defaults, help), so the two cannot drift apart."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, model_validator

from specmoe.errors import InputError
from specmoe.settings import Settings

PLANNING = ("background", "inline", "synchronous")
"""Where the measured engines' prefetch work runs. ``background``: plans and reads on the
prefetch thread (what a server does); ``inline``: plans on the decoding thread, reads on the
prefetch thread (to measure what planning costs there); ``synchronous``: plans and reads on
the decoding thread, at the end of the layer that asked (no overlap: decisions that do not
depend on timing)."""


def _fractions(values: tuple[float, ...]) -> tuple[float, ...]:
    if any(not 0 < f <= 1 for f in values):
        raise ValueError(f"fractions must lie in (0, 1], got {','.join(map(str, values))}")
    return values


CacheFractions = Annotated[
    tuple[float, ...],
    AfterValidator(_fractions),
    Field(min_length=1, description="Fast-tier sizes, as fractions of all routed experts."),
]
"""Fast-tier sizes of a sweep, each in (0, 1]."""


def _batch_sizes(value: tuple[int, ...]) -> tuple[int, ...]:
    if any(b < 1 for b in value):
        raise ValueError(f"batch sizes must be positive, got {','.join(map(str, value))}")
    return value


BatchSizes = Annotated[tuple[int, ...], AfterValidator(_batch_sizes)]
"""Numbers of sequences decoded together, each at least 1."""

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class TierSize(Settings):
    """The fast tier's size: a fraction of all routed experts' bytes, or a number of bytes."""

    fraction: float | None = Field(None, gt=0, le=1)
    bytes: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.fraction is None) == (self.bytes is None):
            raise ValueError("give the fast tier's size as a fraction or as bytes, not both or neither")
        return self

    @classmethod
    def parse(cls, text: str | float, option: str = "--fast-tier") -> TierSize:
        """``25%`` or ``0.25`` (a fraction of all experts), ``512MiB``, ``2GB``, ``4096B``."""
        value = str(text).strip().replace(" ", "").lower()
        match = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[kmg]i?b|b)?", value)
        if match is None:
            raise InputError(f"{option} expects a fraction (0.25 or 25%) or a size (512MiB, 2GB), got {text!r}")
        number, unit = float(match.group(1)), match.group(2)
        if unit is None or unit == "%":
            fraction = number / 100 if unit == "%" else number
            if not 0 < fraction <= 1:
                hint = " (a size needs a unit: 512MiB, 2GB)" if unit is None and number > 1 else ""
                raise InputError(f"{option}: a fraction of the experts must lie in (0, 1], got {text!r}{hint}")
            return cls(fraction=fraction)
        size = int(number * _UNITS[unit])
        if size < 1:
            raise InputError(f"{option} must be positive, got {text!r}")
        return cls(bytes=size)

    def bytes_for(self, total_bytes: int, expert_bytes: int) -> int:
        """The budget in bytes for experts of ``total_bytes`` together, the largest one
        ``expert_bytes``: the one rule every engine sizes its fast tier by. A fraction holds
        at least one expert; bytes must."""
        if self.fraction is not None:
            return max(expert_bytes, int(self.fraction * total_bytes))
        if self.bytes < expert_bytes:
            raise InputError(
                f"a fast tier of {self} cannot hold one expert ({expert_bytes / 2**20:.2f} MiB); give at least that"
            )
        return self.bytes

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{100 * self.fraction:g}%"
        return f"{self.bytes / 2**20:.6g}MiB"


class NextTokenSettings(Settings):
    """Prefetch of the next token's first layers, from a guess of that token made early
    (the model's final norm and unembedding applied to a late layer's residual stream, then
    a token table). Decoder-only models."""

    flag_prefix: ClassVar[str] = "next-token-"

    layer: int = Field(
        ge=0, description="After this MoE layer (counted in the predictor's stack), guess the next token."
    )
    depth: int = Field(1, ge=1, description="How many of the next token's first layers to prefetch.")
    candidates: int = Field(1, ge=1, description="Guessed tokens whose experts are pooled, weighted by probability.")
