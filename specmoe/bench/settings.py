"""Settings of the benchmarks, light enough for the CLI to build its options from them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from specmoe.offload.policy import POLICIES, PrefetchSettings
from specmoe.offload.settings import PLANNING, BatchSizes, CacheFractions, NextTokenSettings
from specmoe.settings import Settings


class OffloadBenchSettings(Settings):
    """A measured offload benchmark: ``specmoe bench offload`` and the ``offload`` section
    of ``specmoe run`` configs."""

    expert_shape: tuple[int, int] = Field(
        (2048, 1024), description="hidden,ffn of the experts read (a real model's shape; OLMoE-1B-7B: 2048,1024)."
    )
    tokens: int = Field(48, gt=0, description="Decode steps timed.")
    warmup: int = Field(16, ge=0, description="Decode steps before the clock starts; they fill the cache.")
    repeats: int = Field(3, ge=1, description="Runs per configuration, in shuffled order; the median is kept.")
    cache_fractions: CacheFractions = (0.1, 0.25, 0.5)
    batch_sizes: BatchSizes = Field(
        (1,),
        min_length=1,
        description="Sequences decoded in lockstep (windows of the test split; a layer needs their experts' union).",
    )
    policies: tuple[str, ...] | None = Field(
        None,
        description="Policies to run (default: all but the presets): "
        + ", ".join(POLICIES)
        + "; one with a predictor runs once per predictor (or the one it was built around), or with the one "
        "named after a colon (cost-aware:token).",
    )
    planning: tuple[Literal[PLANNING], ...] = Field(
        ("background",),
        min_length=1,
        description="Where prefetch work runs: background (prefetch thread), inline (plans on the decoding thread) "
        "or synchronous (no overlap); several: each prefetch run once per mode, interleaved.",
    )
    compute_cost: tuple[Literal["learnt", "probe"], ...] = Field(
        ("learnt",),
        min_length=1,
        description="What a prefetch read costs the layers beside it, for policies that weigh reads by value: "
        "learnt (from the probe's figure on, from the layers timed with and without a read beside them, as serve "
        "learns it) or probe (the probe's figure throughout); several: each such run once per mode, interleaved.",
    )
    device: str = Field(
        "cpu",
        pattern=r"^(cpu|cuda(:\d+)?)$",
        description="cpu: experts on disk, cache in RAM. cuda: experts in pinned RAM, cache on the GPU.",
    )
    prefetch: PrefetchSettings = PrefetchSettings()
    next_token: NextTokenSettings | None = None

    @field_validator("policies")
    @classmethod
    def _known(cls, value):
        names = [entry.partition(":") for entry in value or ()]
        unknown = [name for name, _, _ in names if name not in POLICIES]
        if unknown or value == ():
            raise ValueError(f"must be a non-empty subset of {','.join(POLICIES)}, got {','.join(value)!r}")
        blind = [name for name, _, predictor in names if predictor and POLICIES[name].prefetch != "predictor"]
        if blind:
            raise ValueError(f"{blind[0]} uses no predictor: name none after it")
        return value


MODEL_VARIANTS = ("resident", "accelerate", "mmap", *(p for p in POLICIES if not POLICIES[p].next_token))


class ModelBenchSettings(Settings):
    """A real checkpoint decoding under one memory budget: ``specmoe bench offload --model``."""

    variants: tuple[str, ...] = Field(
        ("resident", "accelerate", "mmap", "on-demand", "lru", "lfu", "oracle"),
        min_length=1,
        description="What runs: resident (the whole model), accelerate (its disk offload), mmap (experts "
        "memory-mapped, the page cache deciding), and specmoe's policies (" + ", ".join(MODEL_VARIANTS[3:]) + ").",
    )
    cache_fractions: CacheFractions = (0.25,)
    tokens: int = Field(16, gt=0, description="Decode steps timed.")
    warmup: int = Field(4, gt=0, description="Decode steps before the clock starts (the first is the prompt's).")
    repeats: int = Field(2, ge=1, description="Runs per configuration, in shuffled order; the median is kept.")
    prompt: str = Field("In the beginning God created the heaven and the earth.", description="The text continued.")
    memory_limit: str = Field(
        "auto",
        description="The memory cgroup every run is placed in: auto (what the offloaded runtime needs for the "
        "fast tier), none, or a size (8GiB).",
    )
    prefetch: PrefetchSettings = PrefetchSettings()

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, value):
        unknown = [v for v in value if v not in MODEL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}; variants: {', '.join(MODEL_VARIANTS)}")
        return value
