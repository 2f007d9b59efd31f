"""gpt-oss: top-k over biased logits, softmax over the selected k only."""

from specmoe.models.base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    block_classes = ("GptOssMLP",)
    experts_skip_padding_id = False  # its one_hot has num_experts classes, not num_experts + 1
