"""GraniteMoE: top-k logits, softmax over the selected k."""

from specmoe.models.base import MoEAdapter


class GraniteMoeAdapter(MoEAdapter):
    family = "granitemoe"
    model_types = ("granitemoe",)
    block_classes = ("GraniteMoeMoE",)
