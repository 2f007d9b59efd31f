"""DBRX: expert weights are stored flattened as (num_experts * ffn_hidden, hidden)."""

from specmoe.models.base import MoEAdapter, MoELayer


class DbrxAdapter(MoEAdapter):
    family = "dbrx"
    model_types = ("dbrx",)
    block_classes = ("DbrxFFN",)
    experts_skip_padding_id = False  # it indexes every expert id it is given, the padding one too

    def num_experts(self, config) -> int:
        return int(config.ffn_config.moe_num_experts)

    def top_k(self, config) -> int:
        return int(config.ffn_config.moe_top_k)

    def expert_parameters(self, layer: MoELayer, expert_idx: int):
        experts = layer.block.experts
        rows = experts.ffn_hidden_size
        return [
            p[expert_idx * rows : (expert_idx + 1) * rows] for p in (experts.mlp.w1, experts.mlp.v1, experts.mlp.w2)
        ]
