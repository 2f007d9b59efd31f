"""JetMoE: the MLP experts' router groups tokens by expert; the (token, slot) order is
rebuilt from what it hands the experts. The mixture-of-attention experts are not recorded."""

import torch

from specmoe.models.base import MoEAdapter, MoELayer, sort_by_weight


class JetMoeAdapter(MoEAdapter):
    family = "jetmoe"
    model_types = ("jetmoe",)
    block_classes = ("JetMoeMoE",)
    offload_unsupported = (
        "its experts are split over two ParallelExperts modules (input_linear, output_linear) "
        "that each loop over every expert, not one experts module called with the selection"
    )

    def capture_hook(self, layer: MoELayer, sink):
        router = layer.block.router

        def hook(_module, _args, output):
            index_sorted, _batch_index, batch_gates, expert_size, logits = output
            num_tokens, k = logits.shape[0], router.top_k
            sizes = torch.as_tensor(expert_size, device=index_sorted.device)
            expert_of_slot = torch.repeat_interleave(torch.arange(router.num_experts, device=sizes.device), sizes)
            ids = torch.empty(num_tokens * k, dtype=torch.long, device=index_sorted.device)
            weights = torch.empty(num_tokens * k, dtype=torch.float32, device=index_sorted.device)
            ids[index_sorted] = expert_of_slot
            weights[index_sorted] = batch_gates.float()
            sink(sort_by_weight(ids.view(num_tokens, k), weights.view(num_tokens, k)))

        return router.register_forward_hook(hook)

    def expert_parameters(self, layer: MoELayer, expert_idx: int):
        return [layer.block.input_linear.weight[expert_idx], layer.block.output_linear.weight[expert_idx]]
