"""Mixtral (softmax over all experts, top-k renormalised)."""

from specmoe.models.base import MoEAdapter


class MixtralAdapter(MoEAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    block_classes = ("MixtralSparseMoeBlock",)
