"""Settings of simulated sweeps (``specmoe simulate`` and the ``simulate`` section of run
configs): the hardware cost model and the sweep. A SIMULATION: nothing here is measured,
except the disk of ``hardware: measured``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from specmoe.offload.policy import POLICIES, PrefetchSettings
from specmoe.offload.settings import BatchSizes, CacheFractions
from specmoe.offload.simulated.cost import PRESETS, HardwareProfile, measured_profile, preset
from specmoe.settings import Settings

SIMULATED_PREDICTOR_POLICIES = tuple(n for n, p in POLICIES.items() if p.prefetch == "predictor" and not p.next_token)
"""A simulation has no model to guess the next token with."""

DEFAULT_COMPUTE_MS = 0.25


class HardwareSettings(Settings):
    """The cost model: a preset link, or this machine's disk, with any figure overridden."""

    hardware: Literal[(*PRESETS, "measured")] = Field(
        "pcie4", description="Link preset (" + ", ".join(PRESETS) + "), or measured: this machine's disk."
    )
    bandwidth_gbps: float | None = Field(None, gt=0, description="Override the link's bandwidth, GB/s.")
    latency_us: float | None = Field(None, ge=0, description="Override the per-transfer latency, µs.")
    compute_ms: float | None = Field(
        None, gt=0, description=f"Override the compute time per MoE layer, ms (default {DEFAULT_COMPUTE_MS})."
    )

    def profile(self) -> HardwareProfile:
        compute_s = (self.compute_ms or DEFAULT_COMPUTE_MS) / 1e3
        base = measured_profile(compute_s) if self.hardware == "measured" else preset(self.hardware)
        return HardwareProfile(
            base.name,
            base.bandwidth_bytes_per_s if self.bandwidth_gbps is None else self.bandwidth_gbps * 1e9,
            base.latency_s if self.latency_us is None else self.latency_us / 1e6,
            compute_s if self.compute_ms is not None else base.compute_s_per_layer,
        )


class SweepSettings(Settings):
    """Every policy over fast-tier sizes and batch sizes, on one split of a trace store."""

    cache_fractions: CacheFractions = (0.1, 0.25, 0.5)
    batch_sizes: BatchSizes = Field((1,), min_length=1, description="Decode batch sizes.")
    max_windows: int | None = Field(64, gt=0, description="Sequences replayed from the split.")
    split: Literal["train", "val", "test"] = Field("test", description="Split the sequences come from.")
    cache_policies: tuple[str, ...] = Field(
        ("lru", "lfu", "lrfu", "belady"), description="Policies without prefetch compared beside the others."
    )
    predictor_policies: tuple[str, ...] = Field(
        ("prefetch",),
        description="Policies run once per predictor, or the one it was built around, or the one named after a "
        "colon (cost-aware:token): " + ", ".join(SIMULATED_PREDICTOR_POLICIES) + ".",
    )
    prefetch: PrefetchSettings = PrefetchSettings()

    @field_validator("cache_policies")
    @classmethod
    def _caches(cls, value):
        caches = [name for name, p in POLICIES.items() if p.prefetch == "none" and p.keeps_experts]
        wrong = [name for name in value if name not in caches]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not a cache policy ({', '.join(caches)})")
        return value

    @field_validator("predictor_policies")
    @classmethod
    def _with_predictors(cls, value):
        wrong = [entry for entry in value if entry.partition(":")[0] not in SIMULATED_PREDICTOR_POLICIES]
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)}: not a simulated predictor policy ({', '.join(SIMULATED_PREDICTOR_POLICIES)})"
            )
        return value
