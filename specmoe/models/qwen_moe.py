"""Qwen2-MoE (with a gated shared expert) and Qwen3-MoE; dense ``mlp_only_layers`` are skipped."""

from specmoe.models.base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    block_classes = ("Qwen2MoeSparseMoeBlock",)


class Qwen3MoeAdapter(MoEAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    block_classes = ("Qwen3MoeSparseMoeBlock",)
