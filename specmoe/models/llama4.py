"""Llama-4 text MoE: sigmoid of the top-k logits scales each expert's input; every expert
runs on every token, with score 0 for the ones not selected, plus a shared expert.

The router returns the dense score matrix; the selected experts are its top-k logits (the
very ``topk`` call the router makes, on the same tensor), and their weights are read from
the scores the experts actually received.
"""

import torch

from specmoe.models.base import MoEAdapter, MoELayer, sort_by_weight


class Llama4Adapter(MoEAdapter):
    family = "llama4"
    model_types = ("llama4_text", "llama4")
    block_classes = ("Llama4TextMoe",)
    offload_unsupported = (
        "every expert runs on every token (dense dispatch; unselected experts are scaled by 0), "
        "so every call needs all of them"
    )

    def capture_hook(self, layer: MoELayer, sink):
        router = layer.block.router

        def hook(_module, _args, output):
            scores, logits = output  # (N, E) each
            ids = torch.topk(logits, router.top_k, dim=1).indices
            sink(sort_by_weight(ids, scores.float().gather(1, ids)))

        return router.register_forward_hook(hook)
