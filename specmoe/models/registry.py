"""Exact ``model_type`` → adapter lookup, and the names of the built-in models."""

from __future__ import annotations

from specmoe.errors import UnsupportedModelError
from specmoe.models.base import MoEAdapter
from specmoe.models.dbrx import DbrxAdapter
from specmoe.models.deepseek import DeepseekV2Adapter, DeepseekV3Adapter
from specmoe.models.gpt_oss import GptOssAdapter
from specmoe.models.granitemoe import GraniteMoeAdapter
from specmoe.models.jetmoe import JetMoeAdapter
from specmoe.models.llama4 import Llama4Adapter
from specmoe.models.mixtral import MixtralAdapter
from specmoe.models.olmoe import OlmoeAdapter
from specmoe.models.phimoe import PhimoeAdapter
from specmoe.models.qwen_moe import Qwen2MoeAdapter, Qwen3MoeAdapter
from specmoe.models.switch import SwitchAdapter

ADAPTERS: tuple[MoEAdapter, ...] = (
    SwitchAdapter(),
    MixtralAdapter(),
    Qwen2MoeAdapter(),
    Qwen3MoeAdapter(),
    OlmoeAdapter(),
    DeepseekV2Adapter(),
    DeepseekV3Adapter(),
    GptOssAdapter(),
    PhimoeAdapter(),
    GraniteMoeAdapter(),
    JetMoeAdapter(),
    DbrxAdapter(),
    Llama4Adapter(),
)
_BY_MODEL_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for(model_type: str) -> MoEAdapter:
    """The adapter for a config's ``model_type``, looked up exactly."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family; supported: " + ", ".join(supported_model_types())
        ) from None
