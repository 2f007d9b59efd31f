"""gpt-oss: top-k over biased logits, softmax over the selected k only."""

from specmoe.models.base import MoEAdapter


class GptOssAdapter(MoEAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    block_classes = ("GptOssMLP",)
