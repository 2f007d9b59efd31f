"""DeepSeek-V2 (softmax, optional group-limited greedy) and V3 (sigmoid + correction bias,
group-limited). The first ``first_k_dense_replace`` layers are dense and not counted.

The weights recorded are the ones the experts multiply by, i.e. after ``routed_scaling_factor``;
the selection is what the router returned, not a recomputed top-k (V3 selects with the
bias-corrected scores but weights with the uncorrected ones).
"""

from specmoe.models.base import MoEAdapter


class DeepseekV2Adapter(MoEAdapter):
    family = "deepseek_v2"
    model_types = ("deepseek_v2",)
    block_classes = ("DeepseekV2Moe",)
    num_experts_keys = ("n_routed_experts",)


class DeepseekV3Adapter(MoEAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    block_classes = ("DeepseekV3MoE",)
    num_experts_keys = ("n_routed_experts",)
