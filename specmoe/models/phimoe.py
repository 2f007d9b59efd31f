"""PhiMoE (sparsemixer routing; the experts receive the router's choice and multipliers)."""

from specmoe.models.base import MoEAdapter


class PhimoeAdapter(MoEAdapter):
    family = "phimoe"
    model_types = ("phimoe",)
    block_classes = ("PhimoeSparseMoeBlock",)
