"""OLMoE: top-8 of 64 fine-grained experts, no renormalisation by default."""

from specmoe.models.base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    block_classes = ("OlmoeSparseMoeBlock",)
